"""Pre-LN transformer block shared by the ViT and the text tower (timm's `Block` parameter names).

Shapes: B batch, N tokens, D width.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import DropPath, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastenc.models.layers.attention import Attention, check_attn_impl


class Block(nn.Module):
    """x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))); x [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, causal: bool = False, attn_impl: str = "auto", norm_eps: float = 1e-6):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, causal=causal, attn_impl=attn_impl)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        x_BND = x_BND + self.drop_path1(self.attn(self.norm1(x_BND)))
        return x_BND + self.drop_path2(self.mlp(self.norm2(x_BND)))


def run_block(block: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Apply `block`, recomputing its activations in backward when `use_checkpoint`.

    Non-reentrant checkpointing: works with inputs that do not require grad, composes with torch.compile and
    DeepSpeed, and restores the RNG state on recompute so DropPath draws the same mask twice.
    """
    if use_checkpoint:
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


def compile_blocks(root: nn.Module, **compile_kwargs) -> int:
    """torch.compile every transformer Block under `root` in place; returns how many.

    Block granularity keeps parameter names (state_dicts, timm interop, DeepSpeed checkpoints are unchanged), gives
    inductor the fusions that matter (LayerNorm, GELU, residual adds around the matmuls) and compiles the code once
    for all blocks of one shape. The eager Block is the reference twin (tests/models/test_compile.py). The first
    step pays the compile (about a minute for the CPU recipe on 2 cores).
    """
    blocks = [m for m in root.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


class BlockStack:
    """The switches of a tower built from a stack of `Block`s (`self.blocks`): the ViT and the text tower."""

    grad_checkpointing: bool

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_attn_impl(self, impl: str) -> None:
        """Switch the attention backend of every block ("auto", "flash", "sdpa", "math")."""
        check_attn_impl(impl)
        for block in self.blocks:
            block.attn.attn_impl = impl
