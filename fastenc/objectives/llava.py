"""LLaVA-1.5's two training stages on fastenc's engine: a trained encoder, frozen, into a language model.

    images -> encoder (from a fastenc run, frozen) -> block `feature_layer` patch tokens -> projector -> the LM's
    input embeddings at the `<image>` positions -> the LM's next-token loss on the assistant's answers only

stage 1 trains the projector alone (encoder and LM frozen and outside the optimizer) on caption conversations;
stage 2 starts from a stage-1 run's projector (`init_from`) and trains projector and LM on instructions (and the
encoder too with vision.train, at its own learning rate). The computation is fastenc.models.vlm.VisionLanguage; the
samples are fastenc.data.conversation's; the batch is fastenc.data.collate.ConversationCollate's:

    "input_ids" / "labels" / "attention_mask" [B, L] int64 (L: the batch's longest sequence rounded up to 8),
    "image" [B, 3, S, S] (normalized on the device; zeros for a text-only sample)

A run exports the encoder as every run does (export/encoder.safetensors), the projector (export/projector.safetensors)
and the LM with its tokenizer in Hugging Face format (export/lm/, `save_pretrained`, loadable by transformers);
fastenc.run.weights.load_vlm puts the three back together.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from fastenc.errors import ConfigError
from fastenc.models.vlm import PROJECTORS, VisionLanguage, build_projector
from fastenc.objectives.base import Objective, build_encoder
from fastenc.objectives.registry import register_objective
from fastenc.run.layout import RunDir

log = logging.getLogger(__name__)

INIT = "init:"


@dataclass
class VisionTowerConfig:
    source: str = ""
    """The encoder: a fastenc run dir (its exported encoder; DINO's is its teacher's backbone), an encoder
    .safetensors (fastenc's export, or any timm-format ViT with `model`), or init:RUN_DIR (that run's encoder before
    its first step: the untrained baseline)."""
    model: str = ""
    """The ViT preset of a .safetensors that fastenc did not export (fastenc's exports name their own)."""
    feature_layer: int = -2
    """The block whose output tokens feed the projector (-2: the penultimate, as LLaVA-1.5)."""
    keep_cls: bool = False
    """Keep the CLS token in front of the patch tokens (LLaVA-1.5 drops it)."""
    train: bool = False
    """Train the encoder too (stage 2), at learning rate `lr`; frozen by default, and then outside the optimizer."""
    lr: float = 2.0e-6
    """The encoder's peak learning rate when it trains (the schedule's shape is optim.lr's)."""


@dataclass
class LanguageModelConfig:
    path: str = ""
    """A Hugging Face causal LM directory (config, weights, fast tokenizer), read locally without network."""
    preset: str = ""
    """Only when `path` does not exist yet: create it as a randomly initialized Llama of this shape
    (fastenc.models.language.LM_PRESETS: llama_tiny, llama_1b) with a byte-level BPE tokenizer fitted on the
    training conversations (vocab_size). For CPU recipes, tests and throughput runs; empty: `path` must exist."""
    vocab_size: int = 1024
    """The fitted tokenizer's vocabulary size (preset only)."""
    fit_on: list = field(default_factory=list)
    """More conversation data (LLaVA .json records or shards) the preset's tokenizer is fitted on besides
    data.train_shards: name the later stages' data (stage 2's instructions), so their words are whole tokens as in
    a pretrained LM's vocabulary rather than split into bytes (preset only)."""
    grad_checkpointing: bool = False
    """Recompute the LM's layers in the backward pass (less activation memory, about a third more compute)."""


@dataclass
class LlavaConfig:
    name: str = "llava"
    """Registered objective name."""
    stage: Literal[1, 2] = 1
    """1: train the projector (pretraining on captions); 2: projector + LM (instruction tuning)."""
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    """The vision encoder."""
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    """mlp2x_gelu (LLaVA-1.5: Linear, GELU, Linear) or linear (LLaVA)."""
    lm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    """The language model."""
    init_from: str = ""
    """A stage-1 run dir whose exported projector this run starts from (stage 2); empty: a fresh projector."""
    chat_format: Literal["auto", "vicuna_v1", "tokenizer"] = "auto"
    """How turns become text: vicuna_v1 (LLaVA-1.5 with Vicuna), tokenizer (the LM tokenizer's chat template), auto
    (the template where the tokenizer has one, else vicuna_v1)."""
    max_length: int = 2048
    """Longer samples are cut to this many tokens, image tokens included (LLaVA-1.5: 2048)."""


def load_vision_encoder(vcfg: VisionTowerConfig) -> tuple[nn.Module, dict[str, str]]:
    """(the encoder `vcfg.source` names, the safetensors metadata its export carries: its ViT preset and config)."""
    from safetensors import safe_open

    from fastenc.models import load_vit

    source = vcfg.source
    if not source:
        raise ConfigError("objective.vision.source is empty: name a fastenc run dir, an encoder .safetensors or "
                          "init:RUN_DIR")
    if source.startswith(INIT):
        return _initial_encoder(source[len(INIT):])
    path = RunDir(source).encoder if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise ConfigError(f"objective.vision.source {source!r}: no encoder at {path} (a run exports it when it "
                          "reaches schedule.steps; finish the run with --resume, or name an encoder .safetensors)")
    try:
        encoder = load_vit(path, vcfg.model or None)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"objective.vision.source {source!r}: {e}") from e
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata() or {})
    if vcfg.model:
        meta = {"model": vcfg.model}
    return encoder, {"format": "pt", **meta}


def _initial_encoder(run: str) -> tuple[nn.Module, dict[str, str]]:
    """The encoder of run dir `run` as its trainer built it before step 1: seeded by its run.seed, built first."""
    from types import SimpleNamespace

    import yaml

    config = RunDir(run).config
    if not os.path.isfile(config):
        raise ConfigError(f"objective.vision.source init:{run}: {run!r} is not a fastenc run dir (no {config})")
    with open(config) as f:
        text = f.read()
    recorded = yaml.safe_load(text)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recorded["run"]["seed"])  # as the trainer does right before building the objective
        encoder = build_encoder(SimpleNamespace(**recorded["model"])).eval()
    return encoder, {"format": "pt", "model": recorded["model"]["name"], "fastenc_config": text}


@register_objective("llava")
class LlavaObjective(VisionLanguage, Objective):
    config_cls = LlavaConfig

    @classmethod
    def prepare(cls, cfg) -> None:
        """Create the preset LM and its tokenizer at lm.path when asked to and absent."""
        lm = cfg.objective.lm
        if os.path.isdir(lm.path) or not lm.preset:
            return
        missing = [data for data in lm.fit_on if "{" not in data and not os.path.exists(data)]
        if missing:
            raise ConfigError(f"objective.lm.fit_on: {', '.join(missing)} not found (make the later stages' data "
                              "before the first stage creates the LM, or leave fit_on empty)")
        from fastenc.models.language import create_preset_lm

        log.warning("language model %s not found: creating a random-init %s there, its tokenizer (vocab %d) fitted "
                    "on %s", lm.path, lm.preset, lm.vocab_size, ", ".join([cfg.data.train_shards, *lm.fit_on]))
        texts = [t for data in [cfg.data.train_shards, *lm.fit_on] for t in _conversation_texts(data)]
        create_preset_lm(lm.path, lm.preset, texts, vocab_size=lm.vocab_size, seed=cfg.run.seed)

    @classmethod
    def missing_assets(cls, cfg) -> str | None:
        if os.path.isdir(cfg.objective.lm.path):
            return None
        return f"the language model {cfg.objective.lm.path!r} is not there"

    def __init__(self, cfg):
        from fastenc.data.conversation import ConversationEncoder, chat_format
        from fastenc.models.language import load_lm

        ocfg = cfg.objective
        if not os.path.isdir(ocfg.lm.path):
            raise ConfigError(f"objective.lm.path {ocfg.lm.path!r} is not a directory: point it at a Hugging Face "
                              "causal LM (config, weights, tokenizer), or set objective.lm.preset to create one")
        encoder, self.encoder_metadata = load_vision_encoder(ocfg.vision)
        super().__init__(cfg, encoder=encoder)
        self.lm, self.tokenizer = load_lm(ocfg.lm.path)
        if ocfg.lm.grad_checkpointing:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.feature_layer, self.keep_cls = ocfg.vision.feature_layer, ocfg.vision.keep_cls
        self.projector = build_projector(ocfg.projector, self.encoder.embed_dim,
                                         self.lm.get_input_embeddings().embedding_dim)
        if ocfg.init_from:
            self._load_projector(ocfg.init_from)
        self.encoder.requires_grad_(ocfg.vision.train)
        self.lm.requires_grad_(ocfg.stage == 2)
        self.conversations = ConversationEncoder(self.tokenizer, chat_format(ocfg.chat_format, self.tokenizer),
                                                 image_token_id=self.image_token_id,
                                                 num_image_tokens=self.num_image_tokens, max_length=ocfg.max_length)

    def _load_projector(self, run: str) -> None:
        from safetensors.torch import load_file

        path = RunDir(run).projector
        if not os.path.isfile(path):
            raise ConfigError(f"objective.init_from {run!r}: no projector at {path} (is it a finished llava run?)")
        try:
            self.projector.load_state_dict(load_file(path))
        except RuntimeError as e:
            raise ConfigError(f"objective.init_from {run!r}: its projector does not fit this one (another "
                              f"projector kind, encoder width or LM width?): {e}") from e

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (no dropout or drop-path in a tower that does not learn)."""
        super().train(mode)
        for part, trains in ((self.encoder, self.cfg.objective.vision.train), (self.lm, self.cfg.objective.stage == 2)):
            part.train(mode and trains)
        return self

    def lr_scale(self, name: str) -> float:
        vision = self.cfg.objective.vision
        return vision.lr / self.cfg.optim.lr if name.startswith("encoder.") else 1.0

    def image_features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if self.cfg.objective.vision.train:
            return super().image_features(images_BCHW)
        with torch.no_grad():  # a frozen encoder keeps no activations for a backward pass
            return super().image_features(images_BCHW)

    def data_spec(self, train: bool = True):
        from fastenc.data.spec import ConversationSpec

        return ConversationSpec(self.image_size)

    def sample_fn(self, train: bool = True):
        from fastenc.data.conversation import ConversationSample
        from fastenc.data.transforms import image_transform

        spec = self.data_spec(train)
        tf = image_transform(spec.image_size, train=False, mean=spec.mean, std=spec.std, normalize=False)
        return ConversationSample(tf, self.conversations, spec.image_size)

    def collate_fn(self, train: bool = True):
        from fastenc.data.collate import ConversationCollate

        pad = self.tokenizer.pad_token_id
        return ConversationCollate(self.tokenizer.unk_token_id if pad is None else pad, multiple_of=8,
                                   encoder=self.conversations)

    def forward(self, batch):
        loss = self.lm_loss(batch["input_ids"], batch["labels"], batch["attention_mask"], batch["image"])
        with torch.no_grad():
            mask = batch["attention_mask"]
            metrics = {"tokens_per_sample": mask.sum(dim=1).float().mean(),
                       "answer_tokens_per_sample": (batch["labels"] != -100).sum(dim=1).float().mean(),
                       "padding_frac": 1 - mask.float().mean()}
        return loss, metrics

    def export_files(self, state: dict[str, torch.Tensor], run_dir: RunDir) -> dict[str, str]:
        """The encoder (timm names, with its source's metadata, so fastenc.models.load_vit rebuilds it), the
        projector, and the LM with its tokenizer in Hugging Face format; not the whole objective in one file (that
        would be a second copy of the LM)."""
        from fastenc.models.language import save_lm

        def part(prefix):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        _save(part("encoder."), run_dir.encoder, self.encoder_metadata)
        _save(part("projector."), run_dir.projector,
              {"format": "pt", "projector": self.cfg.objective.projector,
               "feature_layer": str(self.feature_layer), "keep_cls": str(self.keep_cls)})
        save_lm(self.lm, self.tokenizer, part("lm."), run_dir.language_model)
        return {"encoder": run_dir.encoder, "projector": run_dir.projector, "lm": run_dir.language_model}


def _save(tensors: dict, path: str, metadata: dict) -> None:
    from safetensors.torch import save_file

    from fastenc.utils import atomic

    with atomic.atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def _conversation_texts(data: str) -> list[str]:
    """The conversations of `data` (a records .json or shards) as the LM will read them (rendered in the Vicuna
    format, so the template's words weigh as often as they occur): what a preset LM's tokenizer is fitted on.
    Records that do not parse are left out here (training skips and counts them)."""
    import json

    from fastenc.data.conversation import VICUNA_V1, parse_llava_conversations
    from fastenc.data.records import RecordTable, is_record_file
    from fastenc.data.shards import expand_shards
    from fastenc.data.transforms import CorruptSample

    if is_record_file(data):
        table = RecordTable(data)
        records = (table.record(i) for i in range(len(table)))
    else:
        records = (json.loads(member) for member in _shard_members(expand_shards(data), ".json"))
    texts = []
    for record in records:
        try:
            texts.append(VICUNA_V1.render(parse_llava_conversations(record.get("conversations")))[0])
        except (CorruptSample, AttributeError):
            continue
    return texts


def _shard_members(shards: list[str], suffix: str):
    import tarfile

    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(suffix):
                    yield tar.extractfile(member).read()


__all__ = ["LlavaConfig", "LlavaObjective", "load_vision_encoder", "PROJECTORS"]
