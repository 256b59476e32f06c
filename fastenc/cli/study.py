"""`fastenc study check|run|report STUDY.yaml`: refuses (exit 1) whenever the study's runs are not controlled.

The study file, the state of each run and the recorded runs come from fastenc.study; this module parses, prints
and picks the exit code."""

from __future__ import annotations

import argparse
import subprocess
import sys

from fastenc.run.fingerprint import check_controlled, fingerprint
from fastenc.study import Study, launch_command, load_study, recorded_runs, run_state, uncontrolled_records


def study_command(args: argparse.Namespace) -> int:
    """`fastenc study check|run|report`: refuses (exit 1) whenever the runs are not controlled."""
    study = load_study(args.study, args.overrides)
    labels = [c.run.name for c in study.configs]
    problems = check_controlled(study.configs, labels)
    if problems:
        print(f"study {study.name}: NOT controlled, refusing to {args.study_cmd}:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    if args.study_cmd == "check":
        objectives = ", ".join(f"{c.run.name} ({c.objective.name})" for c in study.configs)
        print(f"study {study.name}: controlled, fingerprint {fingerprint(study.configs[0])['hash']}; runs: "
              f"{objectives}")
        return 0
    return run_study(study, args) if args.study_cmd == "run" else report_study(study, labels)


def run_study(study: Study, args: argparse.Namespace) -> int:
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


def report_study(study: Study, labels: list[str]) -> int:
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
