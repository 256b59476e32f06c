"""Study files: the recipes of one controlled comparison, and where each of their runs stands.

A study compares objectives (CLIP, SigLIP, DINO, ...) trained under identical conditions (what "controlled" means,
and the fingerprint every run records: fastenc.run.fingerprint). A study file lists the recipes of one comparison
(paths relative to the study file):

    name: cpu_study
    runs: [clip_tiny.yaml, siglip_tiny.yaml, dino_tiny.yaml]
    overrides: []        # applied to every run (e.g. schedule.steps=100)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from fastenc.config import Config, ConfigError, config_hash, load_config
from fastenc.run.configs import read_config
from fastenc.run.fingerprint import check_controlled, diff_configs
from fastenc.run.layout import RunDir
from fastenc.run.metrics import metrics_history


# ----------------------------------------------------------------------------------------------------------------
# Study files


@dataclass
class Study:
    name: str
    path: str
    recipes: list  # resolved recipe paths
    overrides: list
    configs: list  # Config per recipe (overrides applied)


def load_study(path: str, extra_overrides=()) -> Study:
    if not os.path.isfile(path):
        raise ConfigError(f"study file {path} not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    unknown = set(data) - {"name", "runs", "overrides"}
    if unknown:
        raise ConfigError(f"study {path}: unknown keys {sorted(unknown)} (valid: name, runs, overrides)")
    runs = data.get("runs") or []
    if not isinstance(runs, list) or len(runs) < 2:
        raise ConfigError(f"study {path}: `runs` must list at least two recipe files")
    base = os.path.dirname(os.path.abspath(path))
    recipes = [r if os.path.isabs(r) else os.path.normpath(os.path.join(base, r)) for r in runs]
    overrides = list(data.get("overrides") or []) + list(extra_overrides)
    configs = [load_config(r, overrides) for r in recipes]
    names = [c.run.name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"study {path}: runs must have distinct run.name values, got {names}")
    return Study(data.get("name") or os.path.splitext(os.path.basename(path))[0], path, recipes, overrides, configs)


def run_state(cfg: Config) -> tuple[str, str]:
    """Where a study run stands, for `study run` to start, continue or skip it: ("new", ...) no run dir yet;
    ("done", ...) trained to schedule.steps and exported with this config; ("partial", ...) a run dir of this config
    without its export (interrupted: resume); ("other", why) a run dir that is not this run (another config, or not
    a fastenc run dir): `study run` refuses rather than train next to it or overwrite it."""
    run_dir = RunDir.of(cfg)
    where = run_dir.root
    if not os.path.exists(where):
        return "new", f"no run dir {where} yet"
    try:
        recorded = read_config(run_dir)
    except ConfigError as e:
        return "other", f"{where} exists but is not a fastenc run dir of this study ({e}): move it away"
    if config_hash(recorded) != config_hash(cfg):
        keys = ", ".join(k for k, _, _ in diff_configs(recorded, cfg).differences) or "(formatting only)"
        return "other", (f"{where} holds a run of another config (differs in: {keys}): move it away, or give this "
                         "study's runs other names (run.name=... in the study's overrides)")
    history = metrics_history(run_dir.metrics) if os.path.isfile(run_dir.metrics) else []
    step = history[-1]["step"] if history else 0
    if run_dir.is_exported() and step >= cfg.schedule.steps:
        return "done", f"{where} is trained (step {step} of {cfg.schedule.steps}, exported)"
    tag = run_dir.latest_checkpoint()
    return "partial", f"{where} stopped at step {step} (checkpoint: {tag or 'none, so from step 0'})"


def launch_command(study: Study, recipe: str, cfg: Config, state: str, *, launcher: str | None = None,
                   max_steps: int | None = None) -> list[str]:
    """The command that trains one study run (launch/pretrain.py under `launcher`, default this Python); a
    "partial" run resumes from its run dir's last checkpoint."""
    import sys

    import fastenc

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fastenc.__file__))), "launch",
                          "pretrain.py")
    options = ["--resume", RunDir.of(cfg).root] if state == "partial" else []
    if max_steps is not None:
        options += ["--max-steps", str(max_steps)]
    prefix = launcher.split() if launcher else [sys.executable]
    return [*prefix, script, *options, "--config", recipe, *study.overrides]


@dataclass
class RecordedRun:
    """What a study run left in its run dir: its config and fingerprint as recorded, its last metrics row."""

    run_dir: RunDir
    config: Config
    fingerprint: dict | None
    last: dict


def recorded_runs(study: Study) -> list[RecordedRun]:
    """Every run of `study` as recorded; ConfigError naming the first one that has not run."""
    from fastenc.run.metrics import last_metrics

    out = []
    for cfg in study.configs:
        run_dir = RunDir.of(cfg)
        if not run_dir.is_run():
            raise ConfigError(f"{run_dir.root} is not a run dir yet: run the study first (`fastenc study run`)")
        out.append(RecordedRun(run_dir, read_config(run_dir), run_dir.read_fingerprint(), last_metrics(run_dir)))
    return out


def uncontrolled_records(runs: list[RecordedRun], labels: list[str]) -> list[str]:
    """Why the recorded runs are not a controlled comparison, one line per problem (empty: they are): their
    recorded configs differ outside the objective, or their fingerprints (with the shards on disk) differ."""
    problems = check_controlled([r.config for r in runs], labels)
    if problems:
        return problems
    first = runs[0]
    keys0 = first.fingerprint["keys"] if first.fingerprint else {}
    for run in runs if first.fingerprint is None else runs[1:]:
        if run.fingerprint is None:
            problems.append(f"{run.run_dir.root}: no fingerprint recorded")
            continue
        keys = run.fingerprint["keys"]
        bad = sorted(k for k in set(keys0) | set(keys) if keys0.get(k) != keys.get(k))
        if bad:
            problems.append(f"{first.run_dir.root} vs {run.run_dir.root}: {', '.join(bad)}")
    return problems

