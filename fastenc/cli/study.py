"""`fastenc study check|run|report STUDY.yaml`: refuses (exit 1) whenever the study's runs are not controlled, exits 2
on a config error.

The study file, the state of each run and the recorded runs come from fastenc.study; this module parses, prints
and picks the exit code."""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys

from fastenc.errors import ConfigError
from fastenc.run.fingerprint import check_controlled, fingerprint
from fastenc.study import Study, launch_command, load_study, recorded_runs, run_state, uncontrolled_records


def add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study YAML (configs/cpu/study.yaml, configs/paper/study.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")


def add_study_run_args(p: argparse.ArgumentParser) -> None:
    add_study_args(p)
    p.add_argument("--launcher", default="",
                   help="command prefix, e.g. 'deepspeed --num_gpus 8' (default: this python)")
    p.add_argument("--max-steps", type=int, default=None)


def _controlled(verb: str):
    """Decorate the study command `verb`: load the study, refuse (exit 1) if its recipes are not controlled, exit 2
    on a config error; else call the command with the study and its run labels."""

    def wrap(command):
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            try:
                study = load_study(args.study, args.overrides)
                labels = [c.run.name for c in study.configs]
                problems = check_controlled(study.configs, labels)
                if problems:
                    print(f"study {study.name}: NOT controlled, refusing to {verb}:", file=sys.stderr)
                    for line in problems:
                        print(f"  {line}", file=sys.stderr)
                    return 1
                return command(study, labels, args)
            except ConfigError as e:
                print(f"fastenc: config error: {e}", file=sys.stderr)
                return 2

        return run

    return wrap


@_controlled("check")
def run_check(study: Study, labels: list[str], args: argparse.Namespace) -> int:
    """Print the study's fingerprint and runs."""
    objectives = ", ".join(f"{c.run.name} ({c.objective.name})" for c in study.configs)
    print(f"study {study.name}: controlled, fingerprint {fingerprint(study.configs[0])['hash']}; runs: {objectives}")
    return 0


@_controlled("run")
def run_run(study: Study, labels: list[str], args: argparse.Namespace) -> int:
    """Train every run of the study that is not done yet, in turn (a partial one resumes)."""
    states = [run_state(cfg) for cfg in study.configs]
    other = [(cfg.run.name, detail) for cfg, (state, detail) in zip(study.configs, states) if state == "other"]
    for name, detail in other:
        print(f"study {study.name}: {name}: {detail}", file=sys.stderr)
    if other:
        return 1
    for recipe, cfg, (state, detail) in zip(study.recipes, study.configs, states):
        if state == "done":
            print(f"study {study.name}: {cfg.run.name}: {detail}; skipped", flush=True)
            continue
        if state == "partial":  # an interrupted run (or study) continues where its last checkpoint left it
            print(f"study {study.name}: {cfg.run.name}: {detail}; resuming", flush=True)
        cmd = launch_command(study, recipe, cfg, state, launcher=args.launcher, max_steps=args.max_steps)
        print(f"study {study.name}: {cfg.run.name}: {' '.join(cmd)}", flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"study {study.name}: run {cfg.run.name} failed with exit code {rc}", file=sys.stderr)
            return rc
    return 0


@_controlled("report")
def run_report(study: Study, labels: list[str], args: argparse.Namespace) -> int:
    """Check the recorded runs, then tabulate their last metrics."""
    runs = recorded_runs(study)
    problems = uncontrolled_records(runs, labels)
    if problems:
        print(f"study {study.name}: the recorded runs are NOT controlled, refusing to report:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"study {study.name}: controlled, fingerprint {runs[0].fingerprint['hash']}")
    print(f"{'run':<16} {'objective':<10} {'step':>6} {'samples':>10} {'loss':>9}")
    for run, label in zip(runs, labels):
        last = run.last
        print(f"{label:<16} {run.config.objective.name:<10} {last.get('step', 0):>6} "
              f"{last.get('samples_seen', 0):>10} {last.get('loss', float('nan')):>9.4f}")
    return 0
