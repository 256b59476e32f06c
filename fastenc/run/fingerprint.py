"""The controlled-comparison guarantee: fingerprints and config diffs.

A study compares objectives (CLIP, SigLIP, DINO, ...) trained under identical conditions. Two configs are
*controlled* when they differ only in the `objective:` section, ignoring keys that cannot change what is trained
(`NOT_TRAINING`: names, output paths, logging and checkpoint cadence, and engine choices that change how the same
math is executed: ZeRO stage, micro-batch split, torch.compile). Precision is kept: it changes the numerics.

The *controlled fingerprint* is a hash over everything that must be equal: model, data (the shard spec, sampling
and, in a run dir, the expanded shard list with file sizes), optimizer, schedule, seed, precision, global batch and
samples seen. Every run dir records it in its fingerprint file (fastenc.run.layout).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from fastenc.config import Config

# Dotted keys (or section prefixes ending in ".") that never change the trained weights.
NOT_TRAINING = (
    "run.name", "run.output_dir", "data.index_dir",
    "engine.zero_stage", "engine.micro_batch_size", "engine.compile", "engine.log_every", "engine.checkpoint_every",
    "engine.keep_checkpoints", "engine.tensorboard", "engine.detailed_timing",
)
OBJECTIVE = "objective."
# What may differ between the vision-language runs of one study stage: the vision tower they are built on (and the
# previous stage's run of that tower, which stage 2 starts from). The LM, projector, data and recipe may not.
VISION_TOWER = ("objective.vision.source", "objective.init_from")


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


def _may_vary(varying: tuple) -> callable:
    """The predicate "key may differ between controlled configs": the NOT_TRAINING keys and the `varying` keys
    (dotted; one ending in "." is a section prefix, and a section's own key counts too)."""
    def may_vary(key: str) -> bool:
        return key in NOT_TRAINING or any(key == v or (v.endswith(".") and (key.startswith(v) or key == v[:-1]))
                                          for v in varying)
    return may_vary


_ignored = _may_vary((OBJECTIVE,))  # what the fingerprint leaves out


def controlled_part(cfg: Config) -> dict:
    """The flattened config minus the objective and the NOT_TRAINING keys, plus derived quantities."""
    flat = {k: v for k, v in flatten(cfg.to_dict()).items() if not _ignored(k)}
    flat["derived.global_batch"] = cfg.data.batch_size
    flat["derived.samples_seen"] = cfg.data.batch_size * cfg.schedule.steps
    return flat


def shard_listing(urls: list[str]) -> list[list] | None:
    """[[basename, size in bytes], ...] of an expanded shard list, or None if a shard is not a local file."""
    listing = []
    for url in urls:
        if not os.path.isfile(url):
            return None
        listing.append([os.path.basename(url), os.path.getsize(url)])
    return listing


def fingerprint(cfg: Config, *, shards: list[str] | None = None) -> dict:
    """{"hash": ..., "keys": {...}} over controlled_part, plus the listing of `shards` (the run's expanded shard
    list) when given."""
    keys = controlled_part(cfg)
    if shards is not None:
        keys["data.shard_listing"] = shard_listing(shards)
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


def diff_configs(a: Config, b: Config, *, varying: tuple = (OBJECTIVE,)) -> Diff:
    """Every key where a and b differ; those outside `varying` (default: the objective section) and NOT_TRAINING
    are uncontrolled. varying=VISION_TOWER compares the vision-language runs of one stage."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    may_vary = _may_vary(varying)
    out = Diff()
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, _MISSING), fb.get(key, _MISSING)
        if va != vb:
            out.differences.append((key, va, vb))
            if not may_vary(key):
                out.uncontrolled.append((key, va, vb))
    return out


def format_diff(diff: Diff, name_a: str, name_b: str) -> str:
    lines = [f"--- {name_a}", f"+++ {name_b}"]
    uncontrolled = {key for key, _, _ in diff.uncontrolled}
    for key, va, vb in diff.differences:
        mark = "!" if key in uncontrolled else " "
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


def check_controlled(configs: list[Config], labels: list[str], *, varying: tuple = (OBJECTIVE,)) -> list[str]:
    """Problems (empty if every config is controlled against the first): one line per offending pair."""
    problems = []
    for cfg, label in zip(configs[1:], labels[1:]):
        d = diff_configs(configs[0], cfg, varying=varying)
        if not d.controlled:
            keys = ", ".join(f"{k} ({va!r} vs {vb!r})" for k, va, vb in d.uncontrolled)
            problems.append(f"{labels[0]} vs {label}: {keys}")
    return problems
