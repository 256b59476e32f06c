"""`fastenc study check|run|report STUDY.yaml`: refuses (exit 1) whenever the study's runs are not controlled, exits 2
on a config error.

The study file, the state of each run and the recorded runs come from fastenc.study; this module parses, prints
and picks the exit code."""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import subprocess
import sys
import time

from fastenc.errors import ConfigError
from fastenc.run.fingerprint import fingerprint
from fastenc.study import (Study, check_study, evaluate_study, launch_command, load_study, missing_prepared,
                           prepare_command, record_timing, recorded_study, run_state)


def add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study YAML (configs/cpu/study.yaml, configs/paper/study.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every encoder run")


def add_study_run_args(p: argparse.ArgumentParser) -> None:
    add_study_args(p)
    p.add_argument("--launcher", default="",
                   help="command prefix, e.g. 'deepspeed --num_gpus 8' (default: this python)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--no-eval", action="store_true", help="train only; skip the study's `eval`")
    p.add_argument("--device", default=None, help="where the evaluation runs (default: cuda when available)")


def _controlled(verb: str):
    """Decorate the study command `verb`: load the study, refuse (exit 1) if its recipes are not controlled, exit 2
    on a config error; else call the command with the study."""

    def wrap(command):
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            try:
                study = load_study(args.study, args.overrides)
                problems = check_study(study)
                if problems:
                    print(f"study {study.name}: NOT controlled, refusing to {verb}:", file=sys.stderr)
                    for line in problems:
                        print(f"  {line}", file=sys.stderr)
                    return 1
                return command(study, args)
            except ConfigError as e:
                print(f"fastenc: config error: {e}", file=sys.stderr)
                return 2

        return run

    return wrap


@_controlled("check")
def run_check(study: Study, args: argparse.Namespace) -> int:
    """Print the study's fingerprint and runs."""
    objectives = ", ".join(f"{r.name} ({r.config.objective.name})" for r in study.runs)
    print(f"study {study.name}: controlled, fingerprint {fingerprint(study.configs[0])['hash']}; runs: {objectives}")
    for k, stage in enumerate(study.vlm_stages, start=1):
        print(f"  VLM stage {k} ({stage[0].recipe}): {', '.join(r.name for r in stage)}; only the vision tower "
              "differs")
    return 0


@_controlled("run")
def run_run(study: Study, args: argparse.Namespace) -> int:
    """Make the study's missing `prepare` files, train every run that is not done yet, in turn (a partial one
    resumes), then evaluate (the study's `eval`)."""
    runs = study.all_runs
    states = [run_state(r.config) for r in runs]
    other = [(r.name, detail) for r, (state, detail) in zip(runs, states) if state == "other"]
    for name, detail in other:
        print(f"study {study.name}: {name}: {detail}", file=sys.stderr)
    if other:
        return 1
    for path, argv in missing_prepared(study):
        print(f"study {study.name}: making {path}: fastenc {shlex.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(prepare_command(argv))
        record_timing(study, "prepare", time.perf_counter() - t0)
        if rc != 0 or not os.path.exists(path):
            print(f"study {study.name}: `fastenc {shlex.join(argv)}` did not make {path} (exit code {rc})",
                  file=sys.stderr)
            return rc or 1
    for run, (state, detail) in zip(runs, states):
        if state == "done":
            print(f"study {study.name}: {run.name}: {detail}; skipped", flush=True)
            continue
        if state == "partial":  # an interrupted run (or study) continues where its last checkpoint left it
            print(f"study {study.name}: {run.name}: {detail}; resuming", flush=True)
        cmd = launch_command(run, state, launcher=args.launcher, max_steps=args.max_steps)
        print(f"study {study.name}: {run.name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        record_timing(study, run.name, time.perf_counter() - t0)
        if rc != 0:
            print(f"study {study.name}: run {run.name} failed with exit code {rc}", file=sys.stderr)
            return rc
    if not study.eval or args.no_eval or args.max_steps is not None:
        return 0
    from fastenc.eval.features import EvalDataError
    from fastenc.utils.optional import cuda_available

    try:
        report = evaluate_study(study, device=args.device or ("cuda" if cuda_available() else "cpu"),
                                command=shlex.join(["fastenc", "study", "run", args.study, *args.overrides]))
    except EvalDataError as e:
        print(f"study {study.name}: evaluation failed: {e}", file=sys.stderr)
        return 2
    print(f"study {study.name}: report {report}")
    return 0


@_controlled("report")
def run_report(study: Study, args: argparse.Namespace) -> int:
    """Check the recorded runs, then tabulate their last metrics."""
    groups, problems = recorded_study(study)
    if problems:
        print(f"study {study.name}: the recorded runs are NOT controlled, refusing to report:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"study {study.name}: controlled, fingerprint {groups[0][0].fingerprint['hash']}")
    print(f"{'run':<28} {'objective':<10} {'step':>6} {'samples':>10} {'loss':>9}")
    for run in (r for group in groups for r in group):
        last = run.last
        print(f"{run.name:<28} {run.config.objective.name:<10} {last.get('step', 0):>6} "
              f"{last.get('samples_seen', 0):>10} {last.get('loss', float('nan')):>9.4f}")
    if study.eval and os.path.isfile(os.path.join(study.eval["out"], "report.md")):
        print(f"evaluation: {os.path.join(study.eval['out'], 'report.md')}")
    return 0
