"""Batch assembly in the loader workers: a list of per-sample dicts -> one batch dict.

Per-sample work (decode, augment) lives in sample_fn; work that is cheaper or only possible per batch lives in
the objective's collate_fn, which also runs in the workers. Every batch dict also gets "num_skipped" from the
loader (not from here).
"""

from __future__ import annotations

import torch


def stack_samples(samples: list[dict]) -> dict:
    """Stack each key of the samples: tensors with torch.stack, anything else (a key string, say) as a list."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    keys = samples[0].keys()
    for i, s in enumerate(samples):
        if s.keys() != keys:
            raise ValueError(f"sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}: sample_fn must return "
                             "the same keys for every sample")
    return {k: torch.stack(v) if isinstance(v[0], torch.Tensor) else v
            for k, v in ((k, [s[k] for s in samples]) for k in keys)}


class CaptionCollate:
    """Stack the images and tokenize the batch's captions in one call: {"caption": [str]} -> {"text": [B, L] int64}.

    pad_to_longest: pad to the batch's longest caption rounded up to `multiple_of` (at most the context length)
    instead of always to the context length. A causal text tower pooled at EOS gives the same features either
    way, so this changes cost, not results. Picklable when the tokenizer is (fastenc's Tokenizer is).
    """

    def __init__(self, tokenizer, *, pad_to_longest: bool = True, multiple_of: int = 8):
        self.tokenizer = tokenizer
        self.pad_to_longest = pad_to_longest
        self.multiple_of = multiple_of

    def __call__(self, samples: list[dict]) -> dict:
        return self.finish(stack_samples(samples))

    def finish(self, batch: dict) -> dict:
        """The per-batch part alone, for batches that arrive already stacked (the DALI path)."""
        captions = batch.pop("caption")
        batch["text"] = self.tokenizer(captions, pad_to_longest=self.pad_to_longest, multiple_of=self.multiple_of)
        return batch

    def __repr__(self):
        return (f"CaptionCollate({self.tokenizer!r}, pad_to_longest={self.pad_to_longest}, "
                f"multiple_of={self.multiple_of})")


class ConversationCollate:
    """Conversation samples -> one batch padded to its longest sequence, rounded up to `multiple_of`:

        {"input_ids" [B, L] int64 (pad_id after the end), "labels" [B, L] int64 (IGNORE after the end),
         "attention_mask" [B, L] int64 (1 on real tokens), "image" [B, 3, S, S] uint8}

    Padding, not packing: one sequence per row, so each image's tokens and its text share a row with causal
    attention only among themselves, and any Hugging Face LM runs it as is. Right padding with the attention mask:
    the LM's positions count from each row's start. `finish(batch)` is the same for batches that arrive stacked with
    the raw records ("conversation": the .json texts, the DALI path): each is encoded with `encoder`, and a record
    that cannot be (a CorruptSample) leaves the batch and is added to its "num_skipped". Picklable."""

    def __init__(self, pad_id: int, *, multiple_of: int = 8, encoder=None):
        self.pad_id, self.multiple_of, self.encoder = int(pad_id), int(multiple_of), encoder

    def __call__(self, samples: list[dict]) -> dict:
        from fastenc.data.conversation import IGNORE

        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        longest = max(len(s["input_ids"]) for s in samples)
        length = -(-longest // self.multiple_of) * self.multiple_of
        ids = torch.full((len(samples), length), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(samples), length), IGNORE, dtype=torch.int64)
        mask = torch.zeros((len(samples), length), dtype=torch.int64)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "image": torch.stack([s["image"] for s in samples])}

    def finish(self, batch: dict) -> dict:
        """Encode and pad a stacked batch of raw records (see the class docstring); rows that fail are dropped."""
        from fastenc.data.conversation import load_record
        from fastenc.data.transforms import CorruptSample

        if self.encoder is None:
            raise ValueError("ConversationCollate.finish needs the ConversationEncoder (encoder=)")
        images, texts = batch.pop("image"), batch.pop("conversation")
        samples, dropped = [], 0
        for row, text in enumerate(texts):
            try:
                ids, labels = self.encoder(load_record(text.encode("utf-8") if isinstance(text, str) else text),
                                           has_image=True)
            except CorruptSample:
                dropped += 1
                continue
            samples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "image": images[row]})
        if not samples:
            raise RuntimeError(f"none of the {len(texts)} conversations of a batch could be encoded: is this "
                               "conversation data (.json with 'conversations')?")
        out = self(samples)
        out["num_skipped"] = batch.get("num_skipped", torch.tensor(0)) + dropped
        return out

    def __repr__(self):
        return f"ConversationCollate(pad_id={self.pad_id}, multiple_of={self.multiple_of})"
