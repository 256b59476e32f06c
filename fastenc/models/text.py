"""Causal text transformer for CLIP-style objectives, shaped like open_clip's TextTransformer (learned absolute
positions, pre-LN causal blocks, ln_final, pooling at the EOS token, linear projection without bias).

It reuses the ViT's `Block` with causal attention, so parameter names inside the blocks are timm's
(`blocks.{i}.attn.qkv`, ...), not open_clip's (`transformer.resblocks.{i}.attn.in_proj_weight`, ...).

Shapes: B batch, L sequence length (<= context_length), W width, E output_dim (the shared embedding size).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fastenc.models.layers.attention import check_attn_impl
from fastenc.models.layers.block import Block, BlockStack, run_block


class TextTransformer(BlockStack, nn.Module):
    """Token ids [B, L] (right-padded with `pad_id`, EOS last in each caption) -> text embedding [B, E]."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, output_dim: int = 512, pad_id: int = 0, attn_impl: str = "auto",
                 grad_checkpointing: bool = False):
        super().__init__()
        check_attn_impl(attn_impl)
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.output_dim, self.pad_id = output_dim, pad_id
        self.grad_checkpointing = grad_checkpointing
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        # LayerNorm eps 1e-5 as in open_clip's text tower (the ViT uses timm's 1e-6).
        self.blocks = nn.ModuleList([
            Block(width, heads, mlp_ratio=mlp_ratio, causal=True, attn_impl=attn_impl, norm_eps=1e-5)
            for _ in range(layers)
        ])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, output_dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """open_clip's init: residual-branch outputs scaled down by sqrt(2 * layers) so depth keeps variance."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * len(self.blocks)) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.text_projection.weight, std=self.width ** -0.5)

    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding", "token_embedding.weight"}

    def _check_tokens(self, tokens_BL: torch.Tensor) -> None:
        if tokens_BL.dim() != 2:
            raise ValueError(f"Expected token ids [B, L], got shape {tuple(tokens_BL.shape)}.")
        if tokens_BL.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Expected integer token ids (torch.long), got dtype {tokens_BL.dtype}; "
                            "pass the tokenizer's output, not embeddings or floats.")
        if tokens_BL.shape[1] > self.context_length:
            raise ValueError(f"Sequence length {tokens_BL.shape[1]} exceeds context_length={self.context_length}; "
                             "truncate in the tokenizer or build the tower with a larger context_length.")

    def forward_features(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> hidden states after ln_final [B, L, W]."""
        self._check_tokens(tokens_BL)
        L = tokens_BL.shape[1]
        x_BLW = self.token_embedding(tokens_BL) + self.positional_embedding[:L]
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x_BLW = run_block(block, x_BLW, use_checkpoint)
        return self.ln_final(x_BLW)

    def eos_index(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Position of the last non-pad token of each row [B], on device (no host sync).

        With right padding and causal attention the state there has seen the whole caption and no padding.
        A row that is all padding gets index 0.
        """
        positions_L = torch.arange(tokens_BL.shape[1], device=tokens_BL.device)
        return ((tokens_BL != self.pad_id) * positions_L).amax(dim=1)

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> projected EOS features [B, E] (not L2-normalised; the objective does that)."""
        x_BLW = self.forward_features(tokens_BL)
        pooled_BW = x_BLW[torch.arange(x_BLW.shape[0], device=x_BLW.device), self.eos_index(tokens_BL)]
        return self.text_projection(pooled_BW)

    def encode(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Alias of forward (through __call__, so hooks and autocast apply): token ids [B, L] -> [B, E]."""
        return self(tokens_BL)


# open_clip text-tower name -> ours, for the parts inside each residual block.
_OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def convert_open_clip_text_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map open_clip text-tower weights to this module's names; the result loads with strict=True.

    Accepts a TextTransformer's state_dict, a CustomTextCLIP's (keys under `text.`) or a whole CLIP model's
    (the `visual.*` and `logit_*` keys are dropped). nn.MultiheadAttention's in_proj packs q, k, v in the same
    [3W, W] order as our `qkv`, so it maps directly.
    """
    out = {}
    for name, value in state_dict.items():
        if name.startswith(("visual.", "logit_")):
            continue
        name = name.removeprefix("text.")
        if name == "text_projection":  # x @ P with P [W, E]  ==  Linear with weight P^T [E, W]
            out["text_projection.weight"] = value.t().contiguous()
            continue
        match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
        if match:
            index, rest = match.groups()
            for old, new in _OPEN_CLIP_BLOCK_NAMES.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            name = f"blocks.{index}.{rest}"
        out[name] = value
    return out
