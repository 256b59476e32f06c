"""The one Vision Transformer of fastenc. Its state_dict uses timm's VisionTransformer names and shapes, so
weights move both ways with `load_state_dict(strict=True)` (tests/models/test_vit.py checks it).

Shapes: B batch, C channels, H/W image height/width, N patch tokens, T = 1 + N tokens (CLS first), D width,
K classes.

timm semantics kept on purpose:
- global_pool="token" pools the CLS token after the final `norm`.
- global_pool="avg" averages the patch tokens; by default (fc_norm=None) the final LayerNorm then moves after
  the pooling: the module is named `fc_norm`, `norm` is Identity, and forward_features returns un-normed tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from torch import nn

from fastenc.models.layers.attention import check_attn_impl
from fastenc.models.layers.block import Block, BlockStack, run_block

GLOBAL_POOLS = ("token", "avg")


class VisionTransformer(BlockStack, nn.Module):
    """ViT with a CLS token and a learned absolute position embedding, resampled for any input size that is a
    multiple of `patch_size`."""

    num_prefix_tokens = 1  # the CLS token; patch tokens are tokens[:, num_prefix_tokens:]

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 0,
                 global_pool: str = "token", embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 fc_norm: Optional[bool] = None, attn_impl: str = "auto", grad_checkpointing: bool = False):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"Unknown global_pool {global_pool!r}; choose one of {', '.join(GLOBAL_POOLS)}.")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}.")
        check_attn_impl(attn_impl)
        self.img_size, self.patch_size = img_size, patch_size
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.grad_checkpointing = grad_checkpointing
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm

        # strict_img_size=False: the size check is ours (_check_input) so the message can say what to do.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, embed_dim))
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last (timm, DeiT).
        # Plain Python, not torch.linspace, so the model can be built on the meta device.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i], attn_impl=attn_impl)
            for i in range(depth)
        ])
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default ('') init: trunc-normal(.02) Linear weights and pos_embed, tiny CLS, zero biases."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def _check_input(self, x_BCHW: torch.Tensor) -> None:
        if x_BCHW.dim() != 4 or x_BCHW.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(f"Expected images [B, {self.patch_embed.proj.in_channels}, H, W], "
                             f"got shape {tuple(x_BCHW.shape)}.")
        H, W = x_BCHW.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"Image size {H}x{W} is not a multiple of patch_size={self.patch_size}; "
                             "resize or crop the input to a multiple of the patch size.")

    def _embed(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend CLS, add the position embedding: [B, C, H, W] -> [B, T, D]."""
        self._check_input(x_BCHW)
        grid = (x_BCHW.shape[-2] // self.patch_size, x_BCHW.shape[-1] // self.patch_size)
        x_BND = self.patch_embed(x_BCHW)
        pos_embed_1TD = self.pos_embed
        if grid != tuple(self.grid_size):  # only other sizes pay for (and are changed by) the bicubic resample
            pos_embed_1TD = resample_abs_pos_embed(self.pos_embed, new_size=grid, old_size=self.grid_size,
                                                   num_prefix_tokens=self.num_prefix_tokens)
        x_BTD = torch.cat([self.cls_token.expand(x_BND.shape[0], -1, -1), x_BND], dim=1)
        return x_BTD + pos_embed_1TD

    def _use_checkpoint(self) -> bool:
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def forward_features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens after the final `norm` [B, T, D] (Identity norm when fc_norm is used)."""
        x_BTD = self._embed(x_BCHW)
        use_checkpoint = self._use_checkpoint()
        for block in self.blocks:
            x_BTD = run_block(block, x_BTD, use_checkpoint)
        return self.norm(x_BTD)

    def forward_intermediates(self, x_BCHW: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Raw (un-normed) outputs [B, T, D] of the blocks at `indices` (negatives count from the end, so [-2] is
        the penultimate block), in the order given. Blocks after the deepest requested one are not run."""
        depth = len(self.blocks)
        if isinstance(indices, int) or not all(isinstance(i, int) for i in indices):
            raise TypeError(f"indices must be a list of block indices, e.g. [-2]; got {indices!r}.")
        bad = [i for i in indices if not -depth <= i < depth]
        if bad:
            raise IndexError(f"Block indices {bad} are out of range for a ViT with {depth} blocks.")
        wanted = [i % depth for i in indices]
        outputs: dict[int, torch.Tensor] = {}
        x_BTD = self._embed(x_BCHW)
        use_checkpoint = self._use_checkpoint()
        for i, block in enumerate(self.blocks[: max(wanted, default=-1) + 1]):
            x_BTD = run_block(block, x_BTD, use_checkpoint)
            if i in wanted:
                outputs[i] = x_BTD
        return [outputs[i] for i in wanted]

    def forward_head(self, x_BTD: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens [B, T, D] -> pooled features [B, D], or logits [B, K] when there is a head."""
        pooled_BD = x_BTD[:, 0] if self.global_pool == "token" else x_BTD[:, self.num_prefix_tokens:].mean(dim=1)
        pooled_BD = self.fc_norm(pooled_BD)
        return pooled_BD if pre_logits else self.head(pooled_BD)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> pooled, normed features [B, D] (num_classes=0) or logits [B, K]."""
        return self.forward_head(self.forward_features(x_BCHW))
