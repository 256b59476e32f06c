"""A run's recorded config: written when a run starts, read by resume, the study runner and evaluation."""

from __future__ import annotations

import os

from fastenc.config import Config, ConfigError, config_to_yaml, load_config
from fastenc.run.layout import CONFIG, RunDir
from fastenc.utils import atomic


def write_config(run_dir: RunDir, cfg: Config) -> None:
    atomic.write_text(run_dir.config, config_to_yaml(cfg))


def read_config(run_dir: RunDir, overrides=()) -> Config:
    if not run_dir.is_run():
        raise ConfigError(f"{run_dir.root} is a directory without {CONFIG}: not a fastenc run dir")
    return load_config(run_dir.config, list(overrides))


def load_config_or_run(path: str, overrides=()) -> Config:
    """A recipe YAML, or a run dir (its recorded config)."""
    if os.path.isdir(path):
        return read_config(RunDir(path), overrides)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such recipe file or run dir")
    return load_config(path, list(overrides))
