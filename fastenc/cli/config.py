"""`fastenc config show|diff` (recipes and run dirs) and the registries a recipe names (`objectives`, `models`)."""

from __future__ import annotations

import argparse
import sys

from fastenc.errors import ConfigError


def add_show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")


def run_show(args: argparse.Namespace) -> int:
    """Print the fully resolved config; exit 2 on a config error."""
    from fastenc.config import config_to_yaml, load_config

    try:
        print(config_to_yaml(load_config(args.config, args.overrides)), end="")
    except ConfigError as e:
        print(f"fastenc: config error: {e}", file=sys.stderr)
        return 2
    return 0


def add_diff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="recipe YAML or run dir")
    p.add_argument("b", help="recipe YAML or run dir")


def run_diff(args: argparse.Namespace) -> int:
    """Print the differences; exit 0 if the pair is controlled (differs only in `objective:`), 1 if not, 2 on a
    config error."""
    from fastenc.run.fingerprint import diff_configs, format_diff
    from fastenc.run.configs import load_config_or_run

    try:
        d = diff_configs(load_config_or_run(args.a), load_config_or_run(args.b))
    except ConfigError as e:
        print(f"fastenc: config error: {e}", file=sys.stderr)
        return 2
    print(format_diff(d, args.a, args.b))
    return 0 if d.controlled else 1


def run_objectives(args: argparse.Namespace) -> int:
    from fastenc.objectives import list_objectives

    print("\n".join(list_objectives()))
    return 0


def run_models(args: argparse.Namespace) -> int:
    from fastenc.models import list_text_towers, list_vits

    print("vision:", ", ".join(list_vits()))
    print("text:  ", ", ".join(list_text_towers()))
    return 0
