"""CLIP (Radford et al. 2021): symmetric InfoNCE between image and caption embeddings."""

from __future__ import annotations

from fastenc.losses import clip_loss
from fastenc.objectives.registry import register_objective
from fastenc.objectives.image_text import ImageTextObjective


@register_objective("clip")
class CLIPObjective(ImageTextObjective):
    def contrastive_loss(self, img_BE, txt_BE, scale, distributed):
        # Local rows against globally gathered columns, gradients through the gather (open_clip's local loss).
        return clip_loss(img_BE, txt_BE, scale, impl=self.cfg.objective.loss_impl, distributed=distributed)
