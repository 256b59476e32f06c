"""The controlled-comparison guarantee: fingerprints, config diffs and study files.

A study compares objectives (CLIP, SigLIP, DINO, ...) trained under identical conditions. Two configs are
*controlled* when they differ only in the `objective:` section, ignoring keys that cannot change what is trained
(`NOT_TRAINING`: names, output paths, logging and checkpoint cadence, and engine choices that change how the same
math is executed: ZeRO stage, micro-batch split, torch.compile). Precision is kept: it changes the numerics.

The *controlled fingerprint* is a hash over everything that must be equal: model, data (the shard spec, sampling
and, in a run dir, the expanded shard list with file sizes), optimizer, schedule, seed, precision, global batch and
samples seen. Every run dir records it in fingerprint.json.

A study file lists the recipes of one comparison (paths relative to the study file):

    name: cpu_study
    runs: [clip_tiny.yaml, siglip_tiny.yaml, dino_tiny.yaml]
    overrides: []        # applied to every run (e.g. schedule.steps=100)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import yaml

from fastenc.config import Config, ConfigError, load_config

# Dotted keys (or section prefixes ending in ".") that never change the trained weights.
NOT_TRAINING = (
    "run.name", "run.output_dir", "data.index_dir",
    "engine.zero_stage", "engine.micro_batch_size", "engine.compile", "engine.log_every", "engine.checkpoint_every",
    "engine.keep_checkpoints", "engine.tensorboard", "engine.detailed_timing",
)
OBJECTIVE = "objective."


def flatten(d, prefix: str = "") -> dict:
    """Nested dict -> {"a.b.c": value}; lists stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _ignored(key: str) -> bool:
    return key.startswith(OBJECTIVE) or key == "objective" or key in NOT_TRAINING


def controlled_part(cfg: Config) -> dict:
    """The flattened config minus the objective and the NOT_TRAINING keys, plus derived quantities."""
    flat = {k: v for k, v in flatten(cfg.to_dict()).items() if not _ignored(k)}
    flat["derived.global_batch"] = cfg.data.batch_size
    flat["derived.samples_seen"] = cfg.data.batch_size * cfg.schedule.steps
    return flat


def shard_listing(spec) -> list[list] | None:
    """[[basename, size in bytes], ...] of the expanded shard list, or None if the shards are not on disk yet."""
    from fastenc.data.shards import expand_shards

    try:
        urls = expand_shards(spec)
    except (FileNotFoundError, ValueError):
        return None
    listing = []
    for url in urls:
        if not os.path.isfile(url):
            return None
        listing.append([os.path.basename(url), os.path.getsize(url)])
    return listing


def fingerprint(cfg: Config, *, with_shards: bool = False) -> dict:
    """{"hash": ..., "keys": {...}} over controlled_part (+ the on-disk shard listing when with_shards)."""
    keys = controlled_part(cfg)
    if with_shards:
        keys["data.shard_listing"] = shard_listing(cfg.data.train_shards)
    blob = json.dumps(keys, sort_keys=True, default=str).encode()
    return {"hash": hashlib.sha256(blob).hexdigest()[:16], "keys": keys}


@dataclass
class Diff:
    differences: list = field(default_factory=list)  # (key, a, b) for every differing key
    uncontrolled: list = field(default_factory=list)  # the subset outside the objective / NOT_TRAINING

    @property
    def controlled(self) -> bool:
        return not self.uncontrolled


_MISSING = "<absent>"


def diff_configs(a: Config, b: Config) -> Diff:
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    out = Diff()
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, _MISSING), fb.get(key, _MISSING)
        if va != vb:
            out.differences.append((key, va, vb))
            if not _ignored(key):
                out.uncontrolled.append((key, va, vb))
    return out


def load_run_or_recipe(path: str, overrides=()) -> Config:
    """A recipe YAML, or a run dir (its recorded config.yaml)."""
    if os.path.isdir(path):
        recorded = os.path.join(path, "config.yaml")
        if not os.path.isfile(recorded):
            raise ConfigError(f"{path} is a directory without config.yaml: not a fastenc run dir")
        path = recorded
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such recipe file or run dir")
    return load_config(path, list(overrides))


def format_diff(diff: Diff, name_a: str, name_b: str) -> str:
    lines = [f"--- {name_a}", f"+++ {name_b}"]
    for key, va, vb in diff.differences:
        mark = "!" if not _ignored(key) else " "
        lines.append(f"{mark} {key}: {va!r} -> {vb!r}")
    if not diff.differences:
        lines.append("  (identical)")
    if diff.controlled:
        lines.append("controlled: yes (differences only in the objective section or in keys that do not change "
                     "training)")
    else:
        keys = ", ".join(k for k, _, _ in diff.uncontrolled)
        lines.append(f"controlled: NO, differs outside the objective section in: {keys}")
    return "\n".join(lines)


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


def check_controlled(configs: list[Config], labels: list[str]) -> list[str]:
    """Problems (empty if every config is controlled against the first): one line per offending pair."""
    problems = []
    for cfg, label in zip(configs[1:], labels[1:]):
        d = diff_configs(configs[0], cfg)
        if not d.controlled:
            keys = ", ".join(f"{k} ({va!r} vs {vb!r})" for k, va, vb in d.uncontrolled)
            problems.append(f"{labels[0]} vs {label}: {keys}")
    return problems


def _run_dir(cfg: Config) -> str:
    """Where a study run lives: the trainer's run dir for it (output_dir/name)."""
    from fastenc.run.layout import RunDir

    return RunDir.of(cfg).root


def run_state(cfg: Config) -> tuple[str, str]:
    """Where a study run stands, for `study run` to start, continue or skip it: ("new", ...) no run dir yet;
    ("done", ...) trained to schedule.steps and exported with this config; ("partial", ...) a run dir of this config
    without its export (interrupted: resume); ("other", why) a run dir that is not this run (another config, or not
    a fastenc run dir): `study run` refuses rather than train next to it or overwrite it."""
    from fastenc.config import config_hash
    from fastenc.run.layout import latest_tag
    from fastenc.run.metrics import metrics_history

    run_dir = _run_dir(cfg)
    if not os.path.exists(run_dir):
        return "new", f"no run dir {run_dir} yet"
    try:
        recorded = load_run_or_recipe(run_dir)
    except ConfigError as e:
        return "other", f"{run_dir} exists but is not a fastenc run dir of this study ({e}): move it away"
    if config_hash(recorded) != config_hash(cfg):
        keys = ", ".join(k for k, _, _ in diff_configs(recorded, cfg).differences) or "(formatting only)"
        return "other", (f"{run_dir} holds a run of another config (differs in: {keys}): move it away, or give this "
                         "study's runs other names (run.name=... in the study's overrides)")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    history = metrics_history(metrics) if os.path.isfile(metrics) else []
    step = history[-1]["step"] if history else 0
    if os.path.isfile(os.path.join(run_dir, "export", "encoder.safetensors")) and step >= cfg.schedule.steps:
        return "done", f"{run_dir} is trained (step {step} of {cfg.schedule.steps}, exported)"
    tag = latest_tag(os.path.join(run_dir, "checkpoints"))
    return "partial", f"{run_dir} stopped at step {step} (checkpoint: {tag or 'none, so from step 0'})"


def _recorded(cfg: Config) -> tuple[str, Config, dict | None]:
    """(run dir, its recorded config, its fingerprint.json or None) for a study run; ConfigError if never run."""
    run_dir = _run_dir(cfg)
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise ConfigError(f"run dir {run_dir} has no config.yaml: run the study first (`fastenc study run`)")
    recorded = load_run_or_recipe(run_dir)
    fp_path = os.path.join(run_dir, "fingerprint.json")
    fp = json.load(open(fp_path)) if os.path.isfile(fp_path) else None
    return run_dir, recorded, fp


def _last_metrics(run_dir: str) -> dict:
    from fastenc.run.metrics import read_metrics

    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [r for r in read_metrics(path) if "loss" in r] if os.path.isfile(path) else []
    return rows[-1] if rows else {}


def run_study_command(args) -> int:
    """`fastenc study check|run|report`: refuses (exit 1) whenever the runs are not controlled."""
    import subprocess
    import sys

    study = load_study(args.study, args.overrides)
    labels = [c.run.name for c in study.configs]
    problems = check_controlled(study.configs, labels)
    if problems:
        print(f"study {study.name}: NOT controlled, refusing to {args.study_cmd}:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    fp = fingerprint(study.configs[0])["hash"]
    if args.study_cmd == "check":
        objectives = ", ".join(f"{c.run.name} ({c.objective.name})" for c in study.configs)
        print(f"study {study.name}: controlled, fingerprint {fp}; runs: {objectives}")
        return 0
    if args.study_cmd == "run":
        import fastenc

        script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fastenc.__file__))), "launch",
                              "pretrain.py")
        states = [run_state(cfg) for cfg in study.configs]
        other = [(cfg.run.name, detail) for cfg, (state, detail) in zip(study.configs, states) if state == "other"]
        if other:
            for name, detail in other:
                print(f"study {study.name}: {name}: {detail}", file=sys.stderr)
            return 1
        for recipe, cfg, (state, detail) in zip(study.recipes, study.configs, states):
            if state == "done":
                print(f"study {study.name}: {cfg.run.name}: {detail}; skipped", flush=True)
                continue
            prefix = args.launcher.split() if args.launcher else [sys.executable]
            cmd = [*prefix, script, "--config", recipe, *study.overrides]
            if args.max_steps is not None:
                cmd[len(prefix) + 1:len(prefix) + 1] = ["--max-steps", str(args.max_steps)]
            if state == "partial":  # an interrupted run (or study) continues where its last checkpoint left it
                cmd[len(prefix) + 1:len(prefix) + 1] = ["--resume", _run_dir(cfg)]
                print(f"study {study.name}: {cfg.run.name}: {detail}; resuming", flush=True)
            print(f"study {study.name}: {cfg.run.name}: {' '.join(cmd)}", flush=True)
            rc = subprocess.call(cmd)
            if rc != 0:
                print(f"study {study.name}: run {cfg.run.name} failed with exit code {rc}", file=sys.stderr)
                return rc
        return 0
    # report
    recorded = [_recorded(c) for c in study.configs]
    problems = check_controlled([r[1] for r in recorded], labels)
    hashes = {r[2]["hash"] if r[2] else None for r in recorded}
    if problems or len(hashes) != 1 or None in hashes:
        print(f"study {study.name}: the recorded runs are NOT controlled, refusing to report:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        if not problems:
            keys0 = recorded[0][2]["keys"] if recorded[0][2] else {}
            for run_dir, _, fpr in recorded[1:]:
                if fpr is None:
                    print(f"  {run_dir}: no fingerprint.json", file=sys.stderr)
                    continue
                bad = sorted(k for k in set(keys0) | set(fpr["keys"]) if keys0.get(k) != fpr["keys"].get(k))
                print(f"  {recorded[0][0]} vs {run_dir}: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"study {study.name}: controlled, fingerprint {hashes.pop()}")
    header = f"{'run':<16} {'objective':<10} {'step':>6} {'samples':>10} {'loss':>9}  knn"
    print(header)
    for (run_dir, cfg, _), label in zip(recorded, labels):
        last = _last_metrics(run_dir)
        knn_path = os.path.join(run_dir, "knn.json")
        knn = json.load(open(knn_path)) if os.path.isfile(knn_path) else {}
        knn_txt = ", ".join(f"{k}={v:.3f}" for k, v in knn.get("accuracy", {}).items()) or "-"
        print(f"{label:<16} {cfg.objective.name:<10} {last.get('step', 0):>6} {last.get('samples_seen', 0):>10} "
              f"{last.get('loss', float('nan')):>9.4f}  {knn_txt}")
    return 0
