"""Multi-head self-attention with selectable backends: flash_attn, torch SDPA, and an explicit fp32 reference.

Shapes: B batch, H heads, N tokens (query and key length are equal: self-attention only), Dh head dim,
D = H * Dh model width.

Backends (`impl`):
    "math"  `attention_ref`: softmax(q k^T * Dh^-0.5) v written out, accumulated in fp32. The test oracle.
    "sdpa"  torch.nn.functional.scaled_dot_product_attention (picks its own flash/mem-efficient/math kernel).
    "flash" flash_attn.flash_attn_func (CUDA, fp16/bf16 only). Optional dependency.
    "auto"  flash when installed and the input is CUDA fp16/bf16, otherwise sdpa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastenc.utils.optional import is_available, require, warn_once

ATTN_IMPLS = ("auto", "flash", "sdpa", "math")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def check_attn_impl(impl: str) -> str:
    """Return `impl` if it names a backend, else raise ValueError listing the valid ones."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"Unknown attention impl {impl!r}; choose one of {', '.join(ATTN_IMPLS)}.")
    return impl


def attention_ref(q_BHND, k_BHND, v_BHND, *, causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Reference attention: scores, softmax and the weighted sum in fp32; output in the input dtype."""
    dtype = q_BHND.dtype
    q, k, v = q_BHND.float(), k_BHND.float(), v_BHND.float()
    scores_BHNN = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        # Top-left aligned mask (query i sees keys 0..i), the same convention as SDPA's is_causal.
        n_q, n_k = scores_BHNN.shape[-2:]
        future_NN = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        scores_BHNN = scores_BHNN.masked_fill(future_NN, float("-inf"))
    probs_BHNN = scores_BHNN.softmax(dim=-1)
    if dropout_p > 0.0:
        probs_BHNN = F.dropout(probs_BHNN, p=dropout_p)
    return (probs_BHNN @ v).to(dtype)


def _check_flash_inputs(q_BHND: torch.Tensor) -> None:
    if not q_BHND.is_cuda or q_BHND.dtype not in _FLASH_DTYPES:
        raise ValueError(
            f"attn_impl='flash' needs CUDA fp16/bf16 tensors, got {q_BHND.dtype} on {q_BHND.device}. "
            "Use attn_impl='auto' (falls back to sdpa) or run under bf16 autocast on a GPU."
        )


def _attention_flash(q_BHND, k_BHND, v_BHND, *, causal: bool, dropout_p: float) -> torch.Tensor:
    # Inputs are checked before the import: installing flash_attn would not help a CPU or fp32 tensor.
    _check_flash_inputs(q_BHND)
    flash_attn = require("flash_attn", feature="attn_impl='flash'")
    # flash_attn wants [B, N, H, Dh]; the transposes are views, flash_attn makes them contiguous if needed.
    out_BNHD = flash_attn.flash_attn_func(
        q_BHND.transpose(1, 2), k_BHND.transpose(1, 2), v_BHND.transpose(1, 2), dropout_p=dropout_p, causal=causal
    )
    return out_BNHD.transpose(1, 2)


def _resolve_auto(q_BHND: torch.Tensor) -> str:
    if not q_BHND.is_cuda:
        return "sdpa"
    if not is_available("flash_attn"):
        warn_once("attention.flash_attn_missing", "flash_attn is not installed; attention falls back to torch SDPA.")
        return "sdpa"
    return "flash" if q_BHND.dtype in _FLASH_DTYPES else "sdpa"


def attention(q_BHND, k_BHND, v_BHND, *, causal: bool = False, impl: str = "auto", dropout_p: float = 0.0):
    """Scaled dot-product attention, q/k/v [B, H, N, Dh] -> [B, H, N, Dh], with scale Dh^-0.5.

    `dropout_p` is applied as given: callers pass 0.0 in eval mode.
    """
    check_attn_impl(impl)
    if q_BHND.dim() != 4 or k_BHND.shape != q_BHND.shape or v_BHND.shape != q_BHND.shape:
        raise ValueError(
            "attention expects q, k, v of equal shape [B, H, N, Dh]; got "
            f"{tuple(q_BHND.shape)}, {tuple(k_BHND.shape)}, {tuple(v_BHND.shape)}."
        )
    if impl == "auto":
        impl = _resolve_auto(q_BHND)
    if impl == "flash":
        return _attention_flash(q_BHND, k_BHND, v_BHND, causal=causal, dropout_p=dropout_p)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND, dropout_p=dropout_p, is_causal=causal)
    return attention_ref(q_BHND, k_BHND, v_BHND, causal=causal, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (`qkv`, `proj`); x [B, N, D] -> [B, N, D].

    `attn_impl` and `causal` are plain attributes and may be changed after construction.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, attn_drop: float = 0.0,
                 causal: bool = False, attn_impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention width {dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.causal = causal
        self.attn_impl = check_attn_impl(attn_impl)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        # Same split as timm: [B, N, 3*D] -> [3, B, H, N, Dh], so q/k/v are views of one matmul's output.
        q, k, v = self.qkv(x_BND).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out_BHND = attention(q, k, v, causal=self.causal, impl=self.attn_impl,
                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(out_BHND.transpose(1, 2).reshape(B, N, D))
