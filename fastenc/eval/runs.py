"""What evaluation needs from a run dir (or a bare encoder file): the vision encoder, and for objectives with a text
side (`Objective.has_text`: CLIP, SigLIP) the tokenizer, text tower and projections to embed prompts and captions.

    run = load_run("runs/clip_tiny")          # or load_run("export/encoder.safetensors")
    base = load_run("init:runs/clip_tiny")    # the same run's weights before step 1: the untrained baseline
    run.encoder                               # the ViT (DINO: the teacher's backbone, as exported)
    run.encode_image(images) / run.encode_text(["a photo of a cat"])   # shared embedding space, L2-normalized
    run.has_text                              # False for DINO and for bare encoder files

Everything is read through the run directory (fastenc.run): the exported encoder and objective (safetensors, no
pickle) with the architecture from the run's recorded config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastenc.eval.features import EvalDataError, encoder_checkpoint, file_identity
from fastenc.run.layout import RunDir


@dataclass
class EvalRun:
    name: str
    source: str
    checkpoint: str | None
    """The encoder file (part of the feature-cache key; None: features are not cached)."""
    encoder: torch.nn.Module
    objective: object = None
    """The image-text objective (CLIP/SigLIP) with its trained weights, or None."""
    metrics_path: str | None = None
    objective_file: str | None = None
    """The file the text side was loaded from (part of the joint-space features' cache key)."""
    text_unavailable: str = "no text tower"
    """Why has_text is False: the objective has no text side, or its files could not be loaded (then the
    image-text protocols are recorded as skipped with this reason; the image-only ones still run)."""

    def objective_identity(self) -> str | None:
        """Path, size and mtime (ns) of objective_file, or None."""
        return ":".join(map(str, file_identity(self.objective_file))) if self.objective_file else None

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
            raise EvalDataError(f"{self.name}: {self.text_unavailable}")
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


INIT = "init:"


def load_run(source: str, *, name: str | None = None, model: str | None = None) -> EvalRun:
    """A run dir (its config and export) or an encoder .safetensors file, ready for evaluation (eval mode, CPU).

    "init:RUN_DIR" (or "init:RECIPE.yaml") is that run's initial weights, named "<run.name>@init": what every
    protocol gives before training, the baseline that says what training added (random ViT features already
    carry color, for example). `model`: the ViT preset of a bare .safetensors file that fastenc did not export
    (a timm checkpoint)."""
    from fastenc.run.weights import load_exported_encoder

    if source.startswith(INIT):
        return _load_init(source, name)
    checkpoint = encoder_checkpoint(source)
    try:
        encoder = load_exported_encoder(checkpoint, None if os.path.isdir(source) else model)
    except (ValueError, RuntimeError) as e:  # no preset to build, or weights that do not fit it
        raise EvalDataError(f"{source}: {e}") from e
    if not os.path.isdir(source):
        return EvalRun(name or os.path.splitext(os.path.basename(source))[0], source, checkpoint, encoder)
    run_dir = RunDir(source)
    cfg = _recorded_config(source)
    run = EvalRun(name or cfg.run.name, source, checkpoint, encoder,
                  metrics_path=run_dir.metrics if os.path.isfile(run_dir.metrics) else None)
    if _objective_class(cfg).has_text:
        try:
            run.objective_file = run_dir.objective
            run.objective = _load_objective(cfg, run.objective_file)
        except EvalDataError as e:
            run.text_unavailable = f"text side not loaded: {e}"
    return run


def _recorded_config(path: str, hint: str = ""):
    from fastenc.config import ConfigError
    from fastenc.run.configs import load_config_or_run

    try:
        return load_config_or_run(path)
    except ConfigError as e:
        raise EvalDataError(f"{path!r}: {e}{hint}") from e


def _objective_class(cfg):
    from fastenc.objectives import get_objective

    return get_objective(cfg.objective.name)


def _load_init(source: str, name: str | None) -> EvalRun:
    """The objective exactly as the trainer builds it before step 1 (same seed, same construction order)."""
    from fastenc.objectives import build_objective

    path = source[len(INIT):]
    cfg = _recorded_config(path, " (init: takes a run dir or a recipe YAML)")
    cls = _objective_class(cfg)
    missing = cls.missing_assets(cfg)
    if missing:
        raise EvalDataError(f"{source!r}: {missing}")
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(cfg.run.seed)  # as fastenc.engine.trainer.train does right before build_objective
        objective = build_objective(cfg).eval()
    # Cache key: a run dir's recorded config is fully resolved (seed included); a recipe may inherit bases that
    # change without it, so its features are not cached.
    checkpoint = RunDir(path).config if os.path.isdir(path) else None
    run = EvalRun(name or f"{cfg.run.name}@init", source, checkpoint, objective.exported_encoder().eval())
    if cls.has_text:
        run.objective, run.objective_file = objective, run.checkpoint
    return run


def _load_objective(cfg, path: str):
    from fastenc.run.weights import load_exported_objective

    if not os.path.isfile(path):
        raise EvalDataError(f"{path} is missing: the image-text protocols (zero-shot, retrieval) need the whole "
                            "objective, which a finished run exports next to its encoder")
    missing = _objective_class(cfg).missing_assets(cfg)
    if missing:
        raise EvalDataError(missing)
    return load_exported_objective(cfg, path)
