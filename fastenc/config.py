"""Typed run configuration: dataclasses, YAML recipes with `base:` inheritance, dotted CLI overrides.

A recipe is a YAML file holding only its deltas from a shared base (`base: ../base/cpu.yaml`, resolved relative to
the file; bases may chain). Overrides on the command line are `section.key=value` (value parsed as YAML).
Unknown keys and wrongly-typed values are errors that name the key and the closest valid one. The fully
resolved config is written into every run dir (`config.yaml`).

Sections (every objective shares all of them except `objective`):
    run        naming, output location, seed
    model      the one vision encoder (a ViT preset + overrides)
    data       shards, batch size, loader
    optim      AdamW hyperparameters and clipping
    schedule   steps, warmup, cosine decay
    engine     DeepSpeed ZeRO stage, precision, logging and checkpoint cadence
    objective  `name` picks a registered objective; the other keys are that objective's own typed config
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from fastenc.errors import ConfigError  # raised here; re-exported for the callers of fastenc.config


# ----------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run dir is `output_dir/name`."""
    output_dir: str = "runs"
    """Parent folder of run dirs."""
    seed: int = 0
    """Global seed: model init, data order (per rank and worker), augmentations."""


@dataclass
class ModelConfig:
    name: str = "vit_test"
    """ViT preset from fastenc.models.list_vits() (timm names: vit_base_patch16_224, ...)."""
    img_size: Optional[int] = None
    """Training resolution; None keeps the preset's."""
    global_pool: Literal["token", "avg"] = "token"
    """Pooled image feature: CLS token ('token') or mean of patch tokens ('avg')."""
    drop_path_rate: float = 0.0
    """Stochastic depth, increasing linearly over blocks."""
    attn_impl: Literal["auto", "flash", "sdpa", "math"] = "auto"
    """Attention backend; 'auto' = flash-attn when installed on GPU, else PyTorch SDPA."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward (non-reentrant torch.utils.checkpoint)."""
    overrides: dict = field(default_factory=dict)
    """Extra preset fields (depth, embed_dim, num_heads, patch_size, ...)."""


@dataclass
class SynthConfig:
    num_samples: int = 0
    """If > 0 and data.train_shards matches nothing, generate this many synthetic samples there first."""
    image_size: int = 64
    """Side of the generated JPEGs."""
    samples_per_shard: int = 1000
    """Samples per generated tar."""


@dataclass
class DataConfig:
    train_shards: str = ""
    """Webdataset shards: directory, brace pattern (shard-{00000..00099}.tar), glob, or comma-separated list; or,
    for the vision-language stage, a LLaVA-style .json of records (read as is, with data.image_folder)."""
    image_folder: str = ""
    """The folder the image paths of a LLaVA-style .json in train_shards are relative to (fastenc.data.records)."""
    batch_size: int = 256
    """Global batch size (all ranks, all accumulation micro-steps). Kept fixed across world sizes."""
    backend: Literal["auto", "dali", "torch"] = "auto"
    """Decoding and augmentation: dali (NVIDIA DALI: GPU decode where there is a GPU, DALI's CPU backend where not),
    torch (PIL + torchvision in DataLoader workers, the reference), or auto (dali when importable, else torch with
    one warning). Both produce the same batch keys and augmentation semantics (tests/data/test_dali.py)."""
    dali_device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where DALI decodes and augments: gpu (mixed decode on this rank's GPU), cpu, or auto (gpu when CUDA is
    available)."""
    index_dir: str = ""
    """Where the DALI index files (<shard stem>.idx + .idx.json) live; empty: next to the shards. Missing or stale
    ones are built (and validated) by rank 0 before training."""
    num_workers: int = 2
    """Per rank: DataLoader worker processes (torch) or DALI threads (dali); the same thread budget either way."""
    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer."""
    resampled: bool = True
    """Draw shards with replacement (as open_clip does at scale): torch, an infinite stream per worker; dali, each
    epoch is len(shards) shards drawn with replacement. False: each epoch is a permutation of the shards."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """Synthetic data generated on first use (CPU recipes and tests)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.2
    """AdamW decoupled weight decay; never applied to biases, norms, embeddings, logit scale/bias."""
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    clip_grad_per_param: float = 0.0
    """Clip each parameter's gradient norm to this value, as facebookresearch/dino's clip_gradients (0 disables).
    Needs engine.zero_stage=0 (ZeRO-1/2/3 keep gradients partitioned, not per parameter); applied after the
    data-parallel averaging and before the global clip."""


@dataclass
class ScheduleConfig:
    steps: int = 1000
    """Optimizer steps; samples seen = steps * data.batch_size."""
    warmup_steps: int = 100
    """Linear warmup from 0 to optim.lr."""
    min_lr_ratio: float = 0.0
    """Cosine decays to optim.lr * min_lr_ratio."""


@dataclass
class EngineConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Parameter/activation precision; losses are always computed in fp32."""
    micro_batch_size: Optional[int] = None
    """Per-rank batch per forward; None = data.batch_size / world size (no accumulation)."""
    log_every: int = 10
    """Log metrics (and sync the host) every N optimizer steps."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    tensorboard: bool = True
    """Write TensorBoard event files next to metrics.jsonl."""
    compile: bool = False
    """torch.compile each transformer block (inductor); the first step pays the compile. Not with ZeRO-3."""
    detailed_timing: bool = False
    """Synchronize the device around forward/backward/step on logging steps for an exact breakdown."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    objective: Any = None
    """The objective's own config dataclass (has a `name`); see fastenc.objectives."""

    def to_dict(self) -> dict:
        return to_dict(self)


# ----------------------------------------------------------------------------------------------------------------
# dict <-> dataclass with validation


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value, tp, path: str):
    """Check/convert `value` against annotation `tp`; raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(f"{path}: expected a {base.__name__}, got {value!r}")
        return copy.deepcopy(value)
    return value


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys (with a suggestion) and wrong types."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown config key '{full}'{_suggest(key, names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{path}.{f.name}" if path else f.name
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], full)
    return cls(**kwargs)


def _deep_merge(base: dict, delta: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in delta.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "overrides":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a recipe, resolving its `base:` chain (paths relative to the including file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"circular `base:` include: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, load_yaml(path.parent / b, _seen + (path.resolve(),)))
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw config dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
        node[parts[-1]] = value
    return data


def build_config(data: dict) -> Config:
    """Validate a raw dict into a Config; the objective section is typed by the registered objective."""
    from fastenc.objectives import objective_config_class  # registry lives with the objectives

    data = copy.deepcopy(data)
    obj = data.pop("objective", None)
    cfg = from_dict(Config, data)
    if not isinstance(obj, dict) or "name" not in obj:
        raise ConfigError("config needs an `objective:` section with a `name` (e.g. clip, siglip)")
    cfg.objective = from_dict(objective_config_class(obj["name"]), obj, "objective")
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Recipe file + overrides -> validated Config."""
    data = load_yaml(path) if path else {}
    return build_config(apply_overrides(data, list(overrides)))


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if cfg.data.batch_size <= 0:
        raise ConfigError("data.batch_size must be positive")
    if cfg.schedule.steps <= 0:
        raise ConfigError("schedule.steps must be positive")
    if not 0 <= cfg.schedule.warmup_steps <= cfg.schedule.steps:
        raise ConfigError("schedule.warmup_steps must lie in [0, schedule.steps]")
    if cfg.engine.micro_batch_size is not None and cfg.engine.micro_batch_size <= 0:
        raise ConfigError("engine.micro_batch_size must be positive or null")
    if cfg.engine.precision == "bf16" and cfg.engine.zero_stage == 0:
        raise ConfigError(
            "engine.precision=bf16 needs engine.zero_stage >= 1: only DeepSpeed's ZeRO optimizers keep fp32 master "
            "weights with fp32 gradient accumulation (ZeRO-1 costs nothing extra on one device)")
    if cfg.engine.compile and cfg.engine.zero_stage == 3:
        raise ConfigError("engine.compile=true is not supported with engine.zero_stage=3 (ZeRO-3's parameter "
                          "gathering hooks would run inside compiled blocks); use ZeRO-2 or compile=false")
    if cfg.optim.clip_grad_per_param < 0:
        raise ConfigError("optim.clip_grad_per_param must be >= 0 (0 disables)")
    if cfg.optim.clip_grad_per_param and cfg.engine.zero_stage != 0:
        raise ConfigError("optim.clip_grad_per_param needs engine.zero_stage=0: with ZeRO-1/2/3 DeepSpeed keeps the "
                          "gradients in flat partitions, not per parameter (use optim.clip_grad instead)")
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards is empty: point it at webdataset shards (dir, brace pattern or list)")


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro_batch_size per rank, gradient accumulation steps) such that micro * accum * world = global batch."""
    global_bs = cfg.data.batch_size
    micro = cfg.engine.micro_batch_size
    if micro is None:
        if global_bs % world_size:
            raise ConfigError(
                f"data.batch_size={global_bs} is not divisible by the world size {world_size}; "
                "change the batch size or set engine.micro_batch_size"
            )
        micro = global_bs // world_size
    if global_bs % (micro * world_size):
        raise ConfigError(
            f"data.batch_size={global_bs} must be a multiple of engine.micro_batch_size * world size "
            f"= {micro} * {world_size}"
        )
    return micro, global_bs // (micro * world_size)
