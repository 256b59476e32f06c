"""The run directory: the contract between training, the study runner, evaluation and analysis.

Every file name of a run dir is defined here and nowhere else; the trainer writes through `RunDir`, and the study
runner, evaluation and analysis read through it. This module needs nothing from fastenc but the atomic writer, so
every layer may know where a run keeps its files (an objective that starts from another run's encoder, for one);
reading and writing a run's config is fastenc.run.configs.

    runs/<name>/
        config.yaml                   the fully resolved config the run trained with
        fingerprint.json              its controlled fingerprint, with the shard listing (fastenc.run.fingerprint)
        metrics.jsonl                 one JSON object per logged step (fastenc.run.metrics)
        tensorboard/                  TensorBoard events of the same metrics
        loss.png                      the loss curve, drawn when the run ends
        checkpoints/stepNNNNNNNN/     DeepSpeed checkpoints (fastenc.engine.checkpoint)
        checkpoints/latest            the tag of the newest complete checkpoint
        export/encoder.safetensors    the vision encoder, timm parameter names, fp32 (fastenc.run.weights)
        export/objective.safetensors  every parameter of the objective (text tower, projections, ...), fp32
        export/README.txt             how to load the encoder
        export/projector.safetensors  a vision-language run's projector (fastenc.objectives.llava), fp32
        export/lm/                    its language model and tokenizer, Hugging Face format (save_pretrained)
        data/rank<N>/                 rank N's working files of the DALI backend (its copy of an index without the
                                      samples found corrupt while training)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from fastenc.utils import atomic

CONFIG = "config.yaml"
FINGERPRINT = "fingerprint.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
EXPORT = "export"
ENCODER = "encoder.safetensors"
OBJECTIVE = "objective.safetensors"
EXPORT_README = "README.txt"
PROJECTOR = "projector.safetensors"
LANGUAGE_MODEL = "lm"
DATA_STATE = "data"


@dataclass(frozen=True)
class RunDir:
    """One run's directory; the paths exist only once the run has written them."""

    root: str

    @classmethod
    def of(cls, cfg) -> "RunDir":
        """Where `cfg` trains: run.output_dir/run.name."""
        return cls(os.path.join(cfg.run.output_dir, cfg.run.name))

    @classmethod
    def fresh(cls, cfg) -> "RunDir":
        """A new run dir for `cfg`: output_dir/name, suffixed -2, -3 ... if that is taken."""
        base = cls.of(cfg).root
        path, i = base, 2
        while os.path.exists(path):
            path, i = f"{base}-{i}", i + 1
        return cls(path)

    def _at(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    config = property(lambda self: self._at(CONFIG))
    fingerprint = property(lambda self: self._at(FINGERPRINT))
    metrics = property(lambda self: self._at(METRICS))
    tensorboard = property(lambda self: self._at(TENSORBOARD))
    loss_plot = property(lambda self: self._at(LOSS_PLOT))
    checkpoints = property(lambda self: self._at(CHECKPOINTS))
    export = property(lambda self: self._at(EXPORT))
    encoder = property(lambda self: self._at(EXPORT, ENCODER))
    objective = property(lambda self: self._at(EXPORT, OBJECTIVE))
    export_readme = property(lambda self: self._at(EXPORT, EXPORT_README))
    projector = property(lambda self: self._at(EXPORT, PROJECTOR))
    language_model = property(lambda self: self._at(EXPORT, LANGUAGE_MODEL))

    def data_work_dir(self, rank: int) -> str:
        """Where the data backend of `rank` keeps its working files (the DALI backend: index copies without the
        corrupt samples it met)."""
        return self._at(DATA_STATE, f"rank{rank}")

    def is_run(self) -> bool:
        """Whether this is a fastenc run dir (it has its config.yaml)."""
        return os.path.isfile(self.config)

    def is_exported(self) -> bool:
        return os.path.isfile(self.encoder)

    def write_fingerprint(self, fingerprint: dict) -> None:
        atomic.write_json(self.fingerprint, fingerprint, default=str)

    def read_fingerprint(self) -> dict | None:
        """fingerprint.json, or None for a run dir without one."""
        if not os.path.isfile(self.fingerprint):
            return None
        with open(self.fingerprint) as f:
            return json.load(f)

    def latest_checkpoint(self) -> str | None:
        """The tag of the newest complete checkpoint, or None."""
        return latest_tag(self.checkpoints)


def latest_tag(ckpt_dir: str) -> str | None:
    """The tag `latest` names in a checkpoint dir, if that checkpoint is complete (its directory exists)."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(ckpt_dir, tag)) else None
