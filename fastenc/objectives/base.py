"""The objective interface shared by CLIP, SigLIP, DINO and (later) the VLM stage.

The trainer calls, in this order and nothing else:
    Objective.prepare(cfg)            once, on local rank 0, before any rank builds the module (tokenizers, ...)
    obj = Objective(cfg)              on every rank
    obj.data_spec(train=True)         what a sample is (fastenc.data.spec): both data backends build their pipelines
                                      from it (DALI; torch, whose per-sample callable is obj.sample_fn)
    obj.collate_fn(train=True)        list of samples -> batch dict (stacking, tokenizing); its .finish(batch), when
                                      present, does the per-batch part for already-stacked DALI batches
    obj.on_step_start(step)           before the step's micro-batches (step-dependent schedules)
    loss, metrics = obj(batch)        batch: dict of tensors on the device (see each objective for keys)
    obj.on_step_end(step)             after each optimizer step (EMA teachers, centers, ...)
    obj.extra_state() / load_extra_state(state)   tensors DeepSpeed does not manage, saved with each checkpoint
`obj.encoder` is the shared ViT that is trained; `no_weight_decay()` names parameters exempt from decay.

Capabilities: what evaluation and later stages (the VLM) ask an objective for, instead of checking its name.
    export_prefix / exported_encoder()  the encoder a run exports (the student itself, or DINO's teacher backbone)
    has_text                            an image-text objective: `tokenizer`, `encode_text(tokens)` and
                                        `encode_image(images)` embed both in one L2-normalized space (zero-shot,
                                        retrieval)
    missing_assets(cfg)                 why the objective cannot be built from cfg here (a file it needs is absent)
    lr_scale(name)                      a parameter's learning rate relative to optim.lr (default 1)
    export_files(state, run_dir)        what a finished run exports; None (the default): the encoder and the whole
                                        objective (fastenc.run.weights.export_from_state_dict)
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn


def build_encoder(model_cfg) -> nn.Module:
    """The one vision encoder, from the `model:` section (identical for every objective)."""
    from fastenc.models import create_vit

    kwargs = dict(model_cfg.overrides)
    if model_cfg.img_size is not None:
        kwargs["img_size"] = model_cfg.img_size
    return create_vit(
        model_cfg.name,
        global_pool=model_cfg.global_pool,
        drop_path_rate=model_cfg.drop_path_rate,
        attn_impl=model_cfg.attn_impl,
        grad_checkpointing=model_cfg.grad_checkpointing,
        **kwargs,
    )


class Objective(nn.Module):
    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    export_prefix: ClassVar[str] = "encoder."
    has_text: ClassVar[bool] = False

    def __init__(self, cfg, encoder: nn.Module | None = None):
        """encoder: a ready vision encoder (the VLM stage's, from another run); default: built from cfg.model."""
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.model) if encoder is None else encoder

    @classmethod
    def prepare(cls, cfg) -> None:
        """One-time preparation of on-disk assets (runs on local rank 0 before construction)."""

    @classmethod
    def missing_assets(cls, cfg) -> str | None:
        """Why the objective cannot be built from `cfg` on this machine without `prepare` (a file it needs is
        absent), or None."""
        return None

    def exported_encoder(self) -> nn.Module:
        """The vision encoder a run exports (export_prefix names it)."""
        return self.get_submodule(self.export_prefix.rstrip("."))

    def lr_scale(self, name: str) -> float:
        """The learning rate of parameter `name` relative to optim.lr (the same schedule, scaled)."""
        return 1.0

    def export_files(self, state: dict[str, torch.Tensor], run_dir) -> dict[str, str] | None:
        """Write what a finished run exports from its fp32 `state` into `run_dir` (fastenc.run.layout.RunDir), on
        rank 0; returns {what: path}. None: the standard export (fastenc.run.weights.export_from_state_dict)."""
        return None

    def data_spec(self, train: bool = True):
        """The sample description (ImageTextSpec, MultiCropSpec, ...) both data backends build from."""
        raise NotImplementedError

    def sample_fn(self, train: bool = True) -> Callable:
        """The torch path's per-sample callable, built from data_spec."""
        from fastenc.data.transforms import torch_sample_fn

        return torch_sample_fn(self.data_spec(train))

    def collate_fn(self, train: bool = True) -> Callable:
        """Picklable callable turning sample_fn outputs into a batch dict; default stacks every tensor key."""
        from fastenc.data.collate import stack_samples

        return stack_samples

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def on_step_start(self, step: int) -> None:
        """Hook before the micro-batches of optimizer step `step` (0-based); default does nothing."""

    def on_step_end(self, step: int) -> None:
        """Hook after each optimizer step; default does nothing."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Named tensors outside DeepSpeed's module state (saved in checkpoints and the export); default none."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what extra_state returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got keys {sorted(state)[:5]}")

    def no_weight_decay(self) -> set[str]:
        """Full parameter names exempt from weight decay besides biases and norm weights (1-D params)."""
        names = set()
        for prefix, module in self.named_modules():
            if module is not self and hasattr(module, "no_weight_decay"):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        return names

    @property
    def image_size(self) -> int:
        return int(self.encoder.img_size)
