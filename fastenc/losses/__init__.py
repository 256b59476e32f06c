"""User-facing loss functions: CLIP, SigLIP and DINO, each with a plain `_ref` twin (the formula as written in the
paper / reference code: the test oracle), an `impl` switch and (CLIP, SigLIP) a distributed mode.

`impl` defaults to "auto": the fastest implementation that is installed and runs on the inputs' device (the C++
extension "native" on CPU, "reference" where it is not built; "triton" on CUDA); "reference" asks for the plain
O(B^2) path, "chunked" for the pure-torch memory-saving one. Every name in LOSS_IMPLS computes the reference's value
and gradients (fastenc.losses.dispatch). The DINO center update (dino_center_update) lives in fastenc.losses.dino;
the autograd collectives in fastenc.losses.distributed.
"""

from fastenc.losses.contrastive import clip_loss, clip_loss_ref
from fastenc.losses.dino import dino_loss, dino_loss_ref
from fastenc.losses.dispatch import LOSS_IMPLS
from fastenc.losses.sigmoid import siglip_loss, siglip_loss_ref

__all__ = ["LOSS_IMPLS", "clip_loss", "clip_loss_ref", "dino_loss", "dino_loss_ref", "siglip_loss", "siglip_loss_ref"]
