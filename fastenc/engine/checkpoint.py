"""Checkpoints that are never half-written, and resume.

In a run dir's checkpoint dir (fastenc.run.layout), each checkpoint is a DeepSpeed checkpoint directory
(module, optimizer shards, scheduler, client state) named by its step, plus the objective's extra state and every
rank's data-stream position; `latest` names the newest complete one.

A checkpoint is written under a temporary tag and renamed into place only after every rank finished writing,
then `latest` is replaced atomically; a crash at any point leaves the previous checkpoint as `latest`.
The checkpoint dir must be on a filesystem shared by all nodes (as DeepSpeed itself assumes). The temporary tag is
a fixed name (`.tmp-stepNNNNNNNN`) rather than fastenc.utils.atomic's random one because every rank writes into the
same directory; the files fastenc itself writes there (and `latest`) go through fastenc.utils.atomic.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from fastenc.engine.distributed import barrier
from fastenc.run.layout import LATEST, latest_tag
from fastenc.run.weights import save_safetensors
from fastenc.utils import atomic


def _tag(step: int) -> str:
    return f"step{step:08d}"


EXTRA_STATE = "objective_extra.safetensors"


def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: dict, *, is_main: bool, keep: int = 2,
                    extra_state: dict[str, torch.Tensor] | None = None, data_state: dict | None = None,
                    rank: int = 0) -> str:
    """Save under a temporary tag, rename, then point `latest` at it. extra_state: the objective's tensors that
    DeepSpeed does not manage (e.g. DINO's teacher and center), written by rank 0 as safetensors inside the tag.
    data_state: this rank's data-stream position (JSON), written by every rank as data/rank{rank}.json."""
    tag = _tag(step)
    tmp_tag = f".tmp-{tag}"
    if is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(os.path.join(ckpt_dir, tmp_tag), ignore_errors=True)
    barrier()
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    if is_main and extra_state:
        save_safetensors(extra_state, os.path.join(ckpt_dir, tmp_tag, EXTRA_STATE), {"format": "pt"})
    if data_state is not None:
        os.makedirs(os.path.join(ckpt_dir, tmp_tag, "data"), exist_ok=True)
        atomic.write_json(os.path.join(ckpt_dir, tmp_tag, "data", f"rank{rank}.json"), data_state, indent=None)
    barrier()  # every rank's shards are on disk
    if is_main:
        final = os.path.join(ckpt_dir, tag)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(os.path.join(ckpt_dir, tmp_tag), final)
        atomic.write_text(os.path.join(ckpt_dir, LATEST), tag)
        tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step") and t != tag)
        for old in tags[: max(len(tags) - (keep - 1), 0)] if keep > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    barrier()
    return tag


def load_checkpoint(engine, ckpt_dir: str, objective=None) -> dict | None:
    """Load the latest complete checkpoint into the engine (and the objective's extra state, if it has one);
    returns its client state, or None if there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
    if objective is not None and objective.extra_state():
        from safetensors.torch import load_file

        extra = os.path.join(ckpt_dir, tag, EXTRA_STATE)
        if not os.path.isfile(extra):
            raise RuntimeError(f"checkpoint {ckpt_dir}/{tag} has no {EXTRA_STATE}, which the {objective.name} "
                               "objective needs (teacher / center): was it written by another objective?")
        objective.load_extra_state(load_file(extra))
    return client_state


def load_data_state(ckpt_dir: str, rank: int) -> dict | None:
    """This rank's data-stream position in the latest checkpoint (None if it holds none for this rank)."""
    tag = latest_tag(ckpt_dir)
    path = os.path.join(ckpt_dir, tag, "data", f"rank{rank}.json") if tag else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the objective from the live engine, on every rank (a collective under ZeRO-3).

    Parameters come from DeepSpeed's fp32 master copies wherever it keeps them (ZeRO-1/2/3, bf16), gathered from
    their partitions; so a bf16 run exports its master weights, not bf16-rounded ones. Frozen parameters have no
    master copy: they come from the module (gathered under ZeRO-3), in the precision the engine holds them. Buffers come from the
    module as they are.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if hasattr(p, "ds_id") and not p.requires_grad:
            # ZeRO-3 partitions frozen parameters too (a frozen encoder or LM) but keeps no master copy of them:
            # gather the module's own copy (in the engine's precision).
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().float().cpu().clone()
            continue
        full = safe_get_full_fp32_param(p)  # None where DeepSpeed keeps no separate master (ZeRO-0 fp32, frozen)
        out[name] = (p if full is None else full).detach().float().cpu().clone()
    persistent = set(module.state_dict(keep_vars=True))  # buffers state_dict would save (non-persistent ones not)
    for name, b in module.named_buffers():
        if name in persistent:
            out[name] = b.detach().cpu().clone()
    return out
