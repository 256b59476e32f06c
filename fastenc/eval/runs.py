"""What evaluation needs from a run dir (or a bare encoder file): the vision encoder, and for image-text objectives
the text side (tokenizer, text tower, projections) to embed class prompts and captions.

    run = load_run("runs/clip_tiny")          # or load_run("export/encoder.safetensors")
    run.encoder                               # the ViT (DINO: the teacher's backbone, as exported)
    run.encode_image(images) / run.encode_text(["a photo of a cat"])   # shared embedding space, L2-normalized
    run.has_text                              # False for DINO and for bare encoder files

Everything is loaded from safetensors (no pickle): export/encoder.safetensors and export/objective.safetensors,
with the architecture from the run's config.yaml.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastenc.eval.features import EvalDataError, encoder_checkpoint


@dataclass
class EvalRun:
    name: str
    source: str
    checkpoint: str
    """The encoder file (part of the feature-cache key)."""
    encoder: torch.nn.Module
    objective: object = None
    """The image-text objective (CLIP/SigLIP) with its trained weights, or None."""
    metrics_path: str | None = None

    @property
    def has_text(self) -> bool:
        return self.objective is not None and hasattr(self.objective, "encode_text")

    def to(self, device) -> "EvalRun":
        """Move the encoder (and the objective) to `device`; embeddings come back on the CPU."""
        self.encoder.to(device)
        if self.objective is not None:
            self.objective.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
        """Texts -> [N, E] L2-normalized embeddings on the CPU (the objective's tokenizer and text tower)."""
        if not self.has_text:
            raise EvalDataError(f"{self.name} has no text tower (objective without text, or a bare encoder file)")
        obj, texts, out = self.objective, list(texts), []
        for start in range(0, len(texts), batch_size):
            tokens = obj.tokenizer(texts[start:start + batch_size], pad_to_longest=True, multiple_of=8)
            out.append(obj.encode_text(tokens.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> [N, E] L2-normalized embeddings in the shared space (image-text objectives only)."""
        if not self.has_text:
            raise EvalDataError(f"{self.name} has no image-text embedding space")
        return self.objective.encode_image(images)


def load_run(source: str, *, name: str | None = None) -> EvalRun:
    """A run dir (config.yaml + export/) or an encoder .safetensors file, ready for evaluation (eval mode, CPU)."""
    from fastenc.eval.knn import load_exported_encoder

    checkpoint = encoder_checkpoint(source)
    encoder = load_exported_encoder(checkpoint)
    if not os.path.isdir(source):
        return EvalRun(name or os.path.splitext(os.path.basename(source))[0], source, checkpoint, encoder)
    from fastenc.config import ConfigError
    from fastenc.study import load_run_or_recipe

    try:
        cfg = load_run_or_recipe(source)
    except ConfigError as e:
        raise EvalDataError(f"run dir {source!r}: {e}") from e
    metrics = os.path.join(source, "metrics.jsonl")
    run = EvalRun(name or cfg.run.name, source, checkpoint, encoder,
                  metrics_path=metrics if os.path.isfile(metrics) else None)
    if cfg.objective.name in ("clip", "siglip"):
        run.objective = _load_objective(cfg, os.path.join(source, "export", "objective.safetensors"))
    return run


def _load_objective(cfg, path: str):
    from safetensors.torch import load_file

    from fastenc.objectives import build_objective

    if not os.path.isfile(path):
        raise EvalDataError(f"{path} is missing: the image-text protocols (zero-shot, retrieval) need the whole "
                            "objective, which a finished run exports next to encoder.safetensors")
    if not os.path.isfile(cfg.objective.tokenizer):
        raise EvalDataError(f"the run's tokenizer {cfg.objective.tokenizer!r} is not there (paths in config.yaml are "
                            "relative to the directory training ran from: run `fastenc eval` from there)")
    objective = build_objective(cfg)
    state = load_file(path)
    objective.load_state_dict({k: v for k, v in state.items() if k in objective.state_dict()}, strict=True)
    return objective.eval()
