"""Fused Triton kernels for the losses; each file holds kernels + launchers + autograd glue + its `<op>_ref` twin.

    contrastive.py  clip_rows_triton     CLIP rows (shared-tile row + column softmax), the `_clip_rows_ref` contract
    sigmoid.py      siglip_block_triton  one SigLIP [B, M] block, the `_siglip_block_ref` contract
    dino.py         dino_loss_triton     DINO v1 loss (+ the teacher batch sum for the center), `dino_loss_ref`

`import fastenc` never imports this package (fastenc.losses reaches the kernel modules lazily, on first use), so
the kernel modules import triton at the top. They take CUDA tensors, or CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1 set before the first kernel module is imported: slow, for tests only). This file imports only
torch: the python-side helpers the launchers share.
"""

from __future__ import annotations

import torch

from fastenc.losses.dispatch import as_scalar  # noqa: F401 - re-exported for the kernel modules


def tile_size(op: str, name: str, value: int, extent: int, minimum: int = 16) -> int:
    """Validate a block size and shrink it to the smallest power of two >= max(extent, minimum).

    tl.dot needs every tile dimension >= 16 and tl.arange a power of two; a tile larger than the padded extent
    only adds masked work (B = 13 with block 64 would compute a 64-row tile for 13 rows)."""
    if value < minimum or value & (value - 1):
        raise ValueError(f"{op}: {name} must be a power of two >= {minimum}, got {value}")
    padded = max(minimum, 1 << max(0, extent - 1).bit_length())
    return min(value, padded)


def check_device(op: str, interpreted: bool, *tensors: torch.Tensor) -> None:
    """All tensors on one device that the kernels can run on: CUDA, or CPU when the kernels are interpreted."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreted:
        return
    hint = ("CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 before importing "
            "fastenc.kernels (tests), or use impl='chunked' / 'reference'")
    raise ValueError(f"{op}: Triton kernels take CUDA tensors, got {device}. {hint}")


def row_major(op: str, name: str, x: torch.Tensor, dtypes=(torch.float32, torch.bfloat16)) -> torch.Tensor:
    """x with unit stride along its last dim (the kernels take a row stride, so column slices need no copy)."""
    if x.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must be one of {[str(d) for d in dtypes]}, got {x.dtype}")
    return x if x.stride(-1) == 1 else x.contiguous()
