"""Sentencepiece tokenizer for captions: train one on a shard set's .txt files, encode to right-padded id rows.

Ids: pad 0, unk 1, bos 2, eos 3. A row is the caption's ids, then EOS, right-padded with 0 to context_length (or,
with pad_to_longest, to the batch's longest caption); a too-long caption is cut so that EOS stays the last token
(the text tower pools at EOS).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
import shutil
import tempfile

import torch

from fastenc.data.shards import expand_shards, tar_samples
from fastenc.utils import atomic
from fastenc.utils.optional import require

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def iter_captions(shards, *, stats: dict | None = None, shuffle_seed: int | None = 0):
    """Yield the decoded .txt captions of a shard set (expand_shards spec), skipping and counting bad ones.

    `stats` (if given) receives num_captions, num_not_utf8, num_empty and num_read_errors. Shards are visited in
    a seeded random order so that a capped read still samples the whole set.
    """
    stats = {} if stats is None else stats
    stats.update(num_captions=0, num_not_utf8=0, num_empty=0, num_read_errors=0)

    def on_error(exn):
        stats["num_read_errors"] += 1
        log.warning("tokenizer corpus: skipping unreadable data (%s)", exn)
        return True

    paths = expand_shards(shards)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(paths)
    samples = tar_samples(({"url": p} for p in paths), handler=on_error, select_files=lambda n: n.endswith(".txt"))
    for sample in samples:
        if "txt" not in sample:
            continue
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            stats["num_not_utf8"] += 1
            continue
        if not text:
            stats["num_empty"] += 1
            continue
        stats["num_captions"] += 1
        yield text


MODEL_TYPES = ("bpe", "unigram")


def train_tokenizer(shards, model_prefix, *, vocab_size: int = 8000, max_sentences: int = 1_000_000,
                    model_type: str = "bpe") -> str:
    """Fit a sentencepiece model on the captions of `shards`; write {model_prefix}.model/.vocab; return the .model path.

    model_type "bpe" (CLIP's tokenizers are BPE) or "unigram". On a small caption set BPE can use a larger
    vocabulary than unigram (whole words become single pieces), which keeps captions short.

    If the corpus is too small for `vocab_size`, the size is lowered to the largest one sentencepiece accepts
    (logged as a warning). At most `max_sentences` captions are read.
    """
    spm = require("sentencepiece", "tokenizer training")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    model_prefix = os.fspath(model_prefix)
    if model_prefix.endswith(".model"):
        model_prefix = model_prefix[: -len(".model")]
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)

    stats: dict = {}
    with tempfile.TemporaryDirectory(prefix="fastenc-spm-") as tmp:
        corpus = os.path.join(tmp, "captions.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            for n, text in enumerate(iter_captions(shards, stats=stats)):
                if n >= max_sentences:
                    break
                f.write(" ".join(text.split()) + "\n")  # one caption per line: fold inner newlines
        if stats["num_not_utf8"] or stats["num_empty"] or stats["num_read_errors"]:
            log.warning("tokenizer corpus: skipped %d non-UTF-8 and %d empty captions, %d read errors",
                        stats["num_not_utf8"], stats["num_empty"], stats["num_read_errors"])
        if stats["num_captions"] == 0:
            raise ValueError(f"no usable .txt captions found in shards {shards!r}; a tokenizer needs captions")

        # Write to a temporary prefix and move at the end: a crash never leaves a half-written .model.
        tmp_prefix = os.path.join(tmp, "spm")
        while True:
            try:
                spm.SentencePieceTrainer.train(
                    input=corpus, model_prefix=tmp_prefix, vocab_size=vocab_size, model_type=model_type,
                    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                    input_sentence_size=max_sentences, shuffle_input_sentence=True, character_coverage=1.0,
                    num_threads=min(16, os.cpu_count() or 1), minloglevel=2,
                )
                break
            except RuntimeError as e:
                # sentencepiece: "Vocabulary size too high (8000). Please set it to a value <= 412."
                match = re.search(r"value <= (\d+)", str(e))
                if not match or int(match.group(1)) >= vocab_size:
                    raise RuntimeError(f"sentencepiece training failed on {stats['num_captions']} captions with "
                                       f"vocab_size={vocab_size}: {e}") from e
                log.warning("corpus of %d captions is too small for vocab_size=%d: using %s instead",
                            stats["num_captions"], vocab_size, match.group(1))
                vocab_size = int(match.group(1))
        for ext in (".vocab", ".model"):  # .model last: its presence means the pair is complete
            with atomic.atomic_path(model_prefix + ext) as dst:  # copied, since tmp may be on another filesystem
                shutil.copyfile(tmp_prefix + ext, dst)
    log.info("trained %s tokenizer (vocab %d) on %d captions -> %s.model", model_type, vocab_size,
             stats["num_captions"], model_prefix)
    return model_prefix + ".model"


class Tokenizer:
    """Caption tokenizer: texts -> LongTensor[N, context_length] (ids, EOS, right pad). Picklable."""

    def __init__(self, model_path, context_length: int):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model {model_path!r} not found. Train one with "
                                    "`fastenc tokenizer train --shards SHARDS --out PREFIX` (writes PREFIX.model).")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (one token plus EOS), got {context_length}")
        with open(model_path, "rb") as f:
            proto = f.read()
        self.model_path = model_path
        self._context_length = int(context_length)
        self._load(proto)

    def _load(self, proto: bytes) -> None:
        spm = require("sentencepiece", "tokenization")
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer {self.model_path!r} has no EOS piece; train it with fastenc (eos id 3)")
        self._pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

    # SentencePieceProcessor is a SWIG object that does not pickle: ship the serialized model instead.
    def __getstate__(self):
        return {"model_path": self.model_path, "context_length": self._context_length, "proto": self._proto}

    def __setstate__(self, state):
        self.model_path = state["model_path"]
        self._context_length = state["context_length"]
        self._load(state["proto"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def context_length(self) -> int:
        return self._context_length

    def __call__(self, texts: list[str] | str, *, pad_to_longest: bool = False, multiple_of: int = 1) -> torch.Tensor:
        """Encode one or more texts -> LongTensor[N, L].

        L = context_length by default. pad_to_longest=True: L = the longest row (EOS included) rounded up to
        `multiple_of`, at most context_length. The ids before each row's EOS are the same either way; a causal
        text tower gives the same EOS features for both, and the shorter rows cost less compute.
        """
        if isinstance(texts, str):
            texts = [texts]
        if multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
        C = self._context_length
        ids = self._sp.encode(list(texts), out_type=int, num_threads=1)
        n = len(ids)
        # Vectorized from here on (no per-caption Python loop: this runs once per batch, after DALI in the
        # training process): token ids past C - 1 are dropped, EOS goes after the kept ones, the rest is padding.
        full = torch.tensor(list(map(len, ids)), dtype=torch.long)
        tokens = torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.long)
        kept = full.clamp(max=C - 1)
        L = C
        if pad_to_longest:
            longest = int(kept.max()) + 1 if n else 1
            L = min(C, -(-longest // multiple_of) * multiple_of)
        out = torch.full((n * L,), self._pad_id, dtype=torch.long)
        if n:
            row = torch.repeat_interleave(torch.arange(n), full)
            pos = torch.arange(tokens.numel()) - torch.repeat_interleave(torch.cumsum(full, 0) - full, full)
            keep = pos < C - 1
            out[row[keep] * L + pos[keep]] = tokens[keep]
            out[torch.arange(n) * L + kept] = self.eos_id
        return out.view(n, L)

    def decode(self, ids) -> str:
        """Inverse of one row of __call__: ids up to the first EOS, pads dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._sp.decode([i for i in ids if i != self._pad_id])

    def __repr__(self):
        return f"Tokenizer({self.model_path!r}, context_length={self._context_length}, vocab_size={self.vocab_size})"
