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
