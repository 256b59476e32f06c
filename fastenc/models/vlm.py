"""A LLaVA-1.5-style vision-language model: a ViT's patch tokens, projected into a causal LM at `<image>` tokens.

    images [B, 3, S, S] -> ViT block `feature_layer` (raw, un-normed output; -2: the penultimate block, as LLaVA-1.5)
        -> patch tokens [B, P, D] (the CLS token dropped unless keep_cls) -> projector -> [B, P, H]
    input_ids [B, L] with P consecutive `<image>` ids per image (fastenc.data.conversation.expand_image_tokens)
        -> the LM's token embeddings, the image positions replaced by the projected patch tokens -> the LM

Shapes: B batch, L sequence, P image tokens per image, D ViT width, H LM width. Any Hugging Face causal LM works
(`get_input_embeddings()`, `inputs_embeds=`, `labels=`); which parts train is the objective's business (requires_grad
and the optimizer's parameter groups), not this module's.
"""

from __future__ import annotations

import torch
from torch import nn

PROJECTORS = ("mlp2x_gelu", "linear")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1.5's `mlp2x_gelu` (Linear -> GELU -> Linear) or LLaVA's original `linear`."""
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"unknown projector {kind!r} (known: {', '.join(PROJECTORS)})")


class VisionLanguage:
    """The VLM computation over `self.encoder` (the ViT), `self.projector` and `self.lm` (a Hugging Face causal LM),
    with `self.image_token_id`, `self.feature_layer` and `self.keep_cls`. Shared by the standalone model below and
    the training objective (fastenc.objectives.llava), which hold the same three parts under the same names."""

    @property
    def num_image_tokens(self) -> int:
        """P: the tokens one image becomes (the patch grid, plus the CLS token with keep_cls)."""
        grid_h, grid_w = self.encoder.grid_size
        return grid_h * grid_w + (self.encoder.num_prefix_tokens if self.keep_cls else 0)

    def image_features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images -> the chosen block's patch tokens [B, P, D] (before the projector)."""
        x_BTD = self.encoder.forward_intermediates(images_BCHW, [self.feature_layer])[0]
        return x_BTD if self.keep_cls else x_BTD[:, self.encoder.num_prefix_tokens:]

    def image_tokens(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images -> their projected tokens [B, P, H]."""
        return self.projector(self.image_features(images_BCHW))

    def embed(self, input_ids_BL: torch.Tensor, images_BCHW: torch.Tensor | None) -> torch.Tensor:
        """The LM's input embeddings [B, L, H], each row's `<image>` positions (exactly P, or none for a text-only
        sample) filled with its image's projected tokens, in order."""
        is_image_BL = input_ids_BL == self.image_token_id
        embed = self.lm.get_input_embeddings()
        x_BLH = embed(input_ids_BL.masked_fill(is_image_BL, 0))
        per_row = is_image_BL.sum(dim=1)
        has_image = per_row > 0
        if not bool(has_image.any()):
            return x_BLH
        wrong = (per_row != 0) & (per_row != self.num_image_tokens)
        if bool(wrong.any()) or images_BCHW is None:
            raise ValueError(f"each sample needs exactly {self.num_image_tokens} <image> tokens or none (got "
                             f"{per_row.tolist()}), and images for those that have them")
        img_NPH = self.image_tokens(images_BCHW[has_image]).to(x_BLH.dtype)
        return x_BLH.masked_scatter(is_image_BL.unsqueeze(-1), img_NPH)

    def lm_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                images: torch.Tensor | None = None) -> torch.Tensor:
        """The LM's next-token loss over the supervised labels (fastenc.data.conversation.IGNORE elsewhere)."""
        out = self.lm(inputs_embeds=self.embed(input_ids, images), attention_mask=attention_mask, labels=labels)
        return out.loss

    @torch.no_grad()
    def generate(self, input_ids_1L: torch.Tensor, image_1CHW: torch.Tensor | None, *, max_new_tokens: int = 32,
                 eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of one prompt (ids with the image's P `<image>` ids in place): the new token ids, up
        to and without `eos_token_id`. The LM's own `generate` (with its KV cache) from the spliced embeddings."""
        out = self.lm.generate(inputs_embeds=self.embed(input_ids_1L, image_1CHW),
                               attention_mask=torch.ones_like(input_ids_1L), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
        new = out[0].tolist()  # from inputs_embeds alone, generate returns only the new tokens
        return new[:new.index(eos_token_id)] if eos_token_id in new else new


class VisionLanguageModel(VisionLanguage, nn.Module):
    """encoder + projector + lm as one module (evaluation, generation; training uses fastenc.objectives.llava)."""

    def __init__(self, encoder: nn.Module, lm: nn.Module, image_token_id: int, *, projector: str = "mlp2x_gelu",
                 feature_layer: int = -2, keep_cls: bool = False):
        super().__init__()
        self.encoder, self.lm = encoder, lm
        self.image_token_id, self.feature_layer, self.keep_cls = int(image_token_id), int(feature_layer), keep_cls
        self.projector = build_projector(projector, encoder.embed_dim, lm.get_input_embeddings().embedding_dim)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                images: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_loss(input_ids, labels, attention_mask, images)
