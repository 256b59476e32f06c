"""A run's exported weights: written when a run finishes, read by evaluation, analysis and downstream users.

export/encoder.safetensors holds the vision encoder with timm parameter names (it loads with strict=True into
`timm.create_model(<model>, num_classes=0)` or `fastenc.models.create_vit`); export/objective.safetensors holds every
parameter of the objective (text tower, projections, DINO's teacher, ...). Both are fp32 and carry the model name,
the objective and the resolved config as metadata. Everything is loaded with safetensors: no pickle.
"""

from __future__ import annotations

import json
import os

import torch

from fastenc.run.layout import ENCODER, RunDir
from fastenc.utils import atomic


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic.atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def export_from_state_dict(state: dict[str, torch.Tensor], run_dir: RunDir, cfg,
                           encoder_prefix: str = "encoder.") -> dict[str, str]:
    """Write the encoder (timm names: `encoder_prefix` stripped; DINO exports its teacher's backbone,
    "teacher.encoder.") and the whole objective into run_dir's export dir; returns {"encoder": path, "objective":
    path}."""
    from fastenc.config import config_to_yaml

    meta = {"format": "pt", "model": cfg.model.name, "objective": cfg.objective.name,
            "fastenc_config": config_to_yaml(cfg)}
    enc = {k[len(encoder_prefix):]: v for k, v in state.items() if k.startswith(encoder_prefix)}
    if not enc:
        raise RuntimeError(f"no `{encoder_prefix}` parameters in the state dict: is this a fastenc objective "
                           "checkpoint?")
    save_safetensors(enc, run_dir.encoder, meta)
    save_safetensors(state, run_dir.objective, meta)
    atomic.write_text(run_dir.export_readme,
                      f"{ENCODER} loads with strict=True into "
                      f"timm.create_model('{cfg.model.name}', num_classes=0) (or fastenc.models.create_vit).\n"
                      + json.dumps({"img_size": cfg.model.img_size, "overrides": cfg.model.overrides}) + "\n")
    return {"encoder": run_dir.encoder, "objective": run_dir.objective}


def load_encoder_state(path: str) -> dict[str, torch.Tensor]:
    """Safe load of an exported encoder (safetensors: no pickle)."""
    from safetensors.torch import load_file

    return load_file(path)


def encoder_file(source: str) -> str:
    """The encoder file of a run dir (its export) or `source` itself; FileNotFoundError saying what to do if there
    is none."""
    if os.path.isdir(source):
        path = RunDir(source).encoder
        if not os.path.isfile(path):
            raise FileNotFoundError(f"run dir {source!r} has no encoder checkpoint (no exported encoder {path}): the "
                                    "export is written when a run reaches schedule.steps; finish the run (--resume), "
                                    "or pass an encoder .safetensors file")
        return path
    if not os.path.isfile(source):
        raise FileNotFoundError(f"encoder {source!r} not found: pass a run dir or an encoder .safetensors file")
    return source


def load_exported_encoder(source: str, model: str | None = None) -> torch.nn.Module:
    """A ViT in eval mode from a run dir's export (or an encoder .safetensors): fastenc.models.load_vit."""
    from fastenc.models import load_vit

    return load_vit(encoder_file(source), model)


def load_exported_objective(cfg, path: str) -> torch.nn.Module:
    """The objective `cfg` describes, in eval mode, with the weights of an exported objective file."""
    from safetensors.torch import load_file

    from fastenc.objectives import build_objective

    objective = build_objective(cfg)
    state = load_file(path)
    objective.load_state_dict({k: v for k, v in state.items() if k in objective.state_dict()}, strict=True)
    return objective.eval()
