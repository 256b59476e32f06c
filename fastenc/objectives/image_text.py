"""Shared machinery of the image-text objectives (CLIP, SigLIP): text tower, projections, tokenizer, batches.

Batch keys: "image" [B, 3, S, S] float, "text" [B, L] int64 token ids (right-padded, EOS-terminated; L is the
batch's longest caption rounded up to 8 with text_padding="longest", else the context length).
Legend: B local batch, D encoder width, E shared embedding size.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fastenc.objectives.base import Objective

log = logging.getLogger(__name__)


@dataclass
class TextTowerConfig:
    name: str = "text_base"
    """Text tower preset (fastenc.models.list_text_towers()): text_base = open_clip ViT-B-16's."""
    overrides: dict = field(default_factory=dict)
    """Preset fields to change (width, layers, heads, context_length, ...)."""


@dataclass
class ImageTextConfig:
    name: str = "clip"
    """Registered objective name."""
    embed_dim: int = 512
    """Shared image/text embedding size."""
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    """Text tower."""
    tokenizer: str = ""
    """Sentencepiece .model; if missing it is trained on data.train_shards' captions (vocab_size) and saved there."""
    vocab_size: int = 32000
    """Vocabulary size used only when the tokenizer has to be trained."""
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    """Sentencepiece model type used only when the tokenizer has to be trained: bpe or unigram."""
    text_padding: Literal["longest", "max_length"] = "longest"
    """longest: pad each batch's captions to its longest one, rounded up to a multiple of 8 (fewer text-tower
    FLOPs, same features, since the tower is causal and pools at EOS); max_length: always to the context length
    (open_clip's behaviour)."""
    crop_scale: list = field(default_factory=lambda: [0.9, 1.0])
    """RandomResizedCrop area range for training images (open_clip's default)."""
    loss_impl: Literal["auto", "reference", "chunked", "native", "triton"] = "auto"
    """Loss implementation (fastenc.losses.LOSS_IMPLS): auto (the fastest one for the device: triton on CUDA, the
    native extension on CPU, else reference), reference, chunked, native or triton. All give the same values and
    gradients (tests/losses, tests/kernels, tests/engine/test_loss_impl_parity.py)."""
    init_logit_scale: float = math.log(1 / 0.07)
    """Initial log of the logit scale (learned)."""
    max_logit_scale: float = 100.0
    """The exponentiated scale is clamped to at most this (open_clip clamps at 100)."""
    init_logit_bias: float = 0.0
    """Initial logit bias (used by SigLIP only)."""


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class ImageTextObjective(Objective):
    """Two towers projected to a shared space; subclasses define `contrastive_loss`."""

    config_cls = ImageTextConfig
    uses_bias = False
    has_text = True

    @classmethod
    def prepare(cls, cfg) -> None:
        ocfg = cfg.objective
        if not ocfg.tokenizer:
            from fastenc.errors import ConfigError

            raise ConfigError("objective.tokenizer is empty: give a path to a sentencepiece .model (trained if missing)")
        if not os.path.exists(ocfg.tokenizer):
            from fastenc.data.tokenizer import train_tokenizer

            prefix = ocfg.tokenizer[: -len(".model")] if ocfg.tokenizer.endswith(".model") else ocfg.tokenizer
            log.warning("tokenizer %s not found: training one (%s, vocab %d) on %s", ocfg.tokenizer,
                        ocfg.tokenizer_type, ocfg.vocab_size, cfg.data.train_shards)
            train_tokenizer(cfg.data.train_shards, prefix, vocab_size=ocfg.vocab_size,
                            model_type=ocfg.tokenizer_type)

    @classmethod
    def missing_assets(cls, cfg) -> str | None:
        if os.path.isfile(cfg.objective.tokenizer):
            return None
        return (f"the run's tokenizer {cfg.objective.tokenizer!r} is not there (paths in a run's config are relative "
                "to the directory training ran from: run from there)")

    def __init__(self, cfg):
        super().__init__(cfg)
        from fastenc.data.tokenizer import Tokenizer
        from fastenc.models import create_text_tower

        ocfg = cfg.objective
        probe = create_text_tower(ocfg.text.name, vocab_size=8, output_dim=8, **ocfg.text.overrides)
        self.tokenizer = Tokenizer(ocfg.tokenizer, probe.context_length)
        del probe
        self.text = create_text_tower(
            ocfg.text.name,
            vocab_size=self.tokenizer.vocab_size,
            output_dim=ocfg.embed_dim,
            pad_id=self.tokenizer.pad_id,
            attn_impl=cfg.model.attn_impl,
            grad_checkpointing=cfg.model.grad_checkpointing,
            **ocfg.text.overrides,
        )
        width = self.encoder.embed_dim
        # open_clip's visual projection: no bias, init scaled by width^-0.5.
        self.image_proj = nn.Linear(width, ocfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=width**-0.5)
        # Shape [1], not 0-dim: DeepSpeed's parameter broadcast views each tensor as bytes, which 0-dim forbids.
        self.logit_scale = nn.Parameter(torch.full((1,), float(ocfg.init_logit_scale)))
        if self.uses_bias:
            self.logit_bias = nn.Parameter(torch.full((1,), float(ocfg.init_logit_bias)))

    def data_spec(self, train: bool = True):
        from fastenc.data.spec import ImageTextSpec

        return ImageTextSpec(self.image_size, train=train, crop_scale=tuple(self.cfg.objective.crop_scale))

    def collate_fn(self, train: bool = True):
        from fastenc.data.collate import CaptionCollate

        return CaptionCollate(self.tokenizer, pad_to_longest=self.cfg.objective.text_padding == "longest",
                              multiple_of=8)

    def no_weight_decay(self) -> set[str]:
        names = super().no_weight_decay() | {"logit_scale"}
        return names | ({"logit_bias"} if self.uses_bias else set())

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.encoder(image)).float(), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(text).float(), dim=-1)

    def contrastive_loss(self, img_BE, txt_BE, scale, distributed):
        raise NotImplementedError

    def forward(self, batch):
        img_BE = self.encode_image(batch["image"])
        txt_BE = self.encode_text(batch["text"])
        # Clamp instead of open_clip's in-place clamp of the parameter after the step: same logits, no
        # parameter surgery under ZeRO-3 partitioning.
        scale = self.logit_scale.float().exp().clamp(max=self.cfg.objective.max_logit_scale).squeeze(0)
        loss = self.contrastive_loss(img_BE, txt_BE, scale, _distributed())
        with torch.no_grad():
            # In-batch image->text top-1 on the local batch: a cheap learning signal for the logs.
            sim = img_BE @ txt_BE.T
            acc = (sim.argmax(dim=1) == torch.arange(sim.shape[0], device=sim.device)).float().mean()
        metrics = {"logit_scale": scale.detach(), "i2t_acc": acc}
        if self.uses_bias:
            metrics["logit_bias"] = self.logit_bias.detach().float().squeeze(0)
        return loss, metrics
