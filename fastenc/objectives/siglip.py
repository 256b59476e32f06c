"""SigLIP (Zhai et al. 2023): independent sigmoid loss over every image-caption pair."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastenc.losses import siglip_loss
from fastenc.objectives.registry import register_objective
from fastenc.objectives.image_text import ImageTextConfig, ImageTextObjective


@dataclass
class SigLIPConfig(ImageTextConfig):
    name: str = "siglip"
    init_logit_scale: float = math.log(10.0)
    """SigLIP initializes t = 10 (log scale log 10)."""
    init_logit_bias: float = -10.0
    """SigLIP initializes b = -10 so that the many negatives start with small loss."""


@register_objective("siglip")
class SigLIPObjective(ImageTextObjective):
    config_cls = SigLIPConfig
    uses_bias = True

    def contrastive_loss(self, img_BE, txt_BE, scale, distributed):
        # Text features travel around the ring of ranks; each rank scores its images against all of them.
        bias = self.logit_bias.float().squeeze(0)
        return siglip_loss(img_BE, txt_BE, scale, bias, impl=self.cfg.objective.loss_impl, distributed=distributed)
