"""A run's exported weights: written when a run finishes, read by evaluation, analysis and downstream users.

export/encoder.safetensors holds the vision encoder with timm parameter names (it loads with strict=True into
`timm.create_model(<model>, num_classes=0)` or `fastenc.models.create_vit`); export/objective.safetensors holds every
parameter of the objective (text tower, projections, DINO's teacher, ...). Both are fp32 and carry the model name,
the objective and the resolved config as metadata. Everything is loaded with safetensors: no pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

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


@dataclass
class LoadedVLM:
    """A vision-language run's export put back together (fastenc.objectives.llava writes it), in eval mode."""

    model: torch.nn.Module
    """fastenc.models.vlm.VisionLanguageModel: encoder + projector + LM."""
    tokenizer: object
    conversations: object
    """fastenc.data.conversation.ConversationEncoder: the run's chat format, image tokens and max length."""
    image_transform: object
    """PIL image -> normalized [3, S, S]: the encoder's eval transform, as in training."""


def load_vlm(run_dir: str) -> LoadedVLM:
    """A finished llava run (its export: encoder, projector, LM + tokenizer; its config: chat format, max length),
    ready for generation on the CPU."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fastenc.data.conversation import ConversationEncoder, chat_format
    from fastenc.data.transforms import image_transform
    from fastenc.models import load_vit
    from fastenc.models.language import load_lm
    from fastenc.models.vlm import VisionLanguageModel
    from fastenc.run.configs import load_config_or_run

    run = RunDir(run_dir)
    missing = [p for p in (run.encoder, run.projector, run.language_model) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished vision-language run: {', '.join(missing)} missing (a "
                                "llava run exports them when it reaches schedule.steps)")
    cfg = load_config_or_run(run_dir)
    with safe_open(run.projector, "pt") as f:
        meta = f.metadata() or {}
    lm, tokenizer = load_lm(run.language_model)
    model = VisionLanguageModel(load_vit(run.encoder), lm, tokenizer.convert_tokens_to_ids("<image>"),
                                projector=meta.get("projector", cfg.objective.projector),
                                feature_layer=int(meta.get("feature_layer", cfg.objective.vision.feature_layer)),
                                keep_cls=meta.get("keep_cls", str(cfg.objective.vision.keep_cls)) == "True")
    model.projector.load_state_dict(load_file(run.projector))
    model.eval()
    conversations = ConversationEncoder(tokenizer, chat_format(cfg.objective.chat_format, tokenizer),
                                        image_token_id=model.image_token_id, num_image_tokens=model.num_image_tokens,
                                        max_length=cfg.objective.max_length)
    size = int(model.encoder.img_size)
    return LoadedVLM(model, tokenizer, conversations, image_transform(size, train=False))
