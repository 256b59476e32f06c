"""User-facing loss functions: CLIP and SigLIP, each with a plain `_ref` twin, an `impl` switch and a distributed mode.

`impl` names: see LOSS_IMPLS ("auto" = fastest available). The autograd collectives live in losses/distributed.py.
"""

from fastenc.losses.contrastive import clip_loss, clip_loss_ref
from fastenc.losses.dispatch import LOSS_IMPLS
from fastenc.losses.sigmoid import siglip_loss, siglip_loss_ref

__all__ = ["LOSS_IMPLS", "clip_loss", "clip_loss_ref", "siglip_loss", "siglip_loss_ref"]
