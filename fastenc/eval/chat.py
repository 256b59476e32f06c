"""Ask a trained vision-language run about an image: greedy answers, and their accuracy on records with known answers.

    vlm = load_vlm("runs/llava_tiny_stage2")                   # fastenc.run.weights
    answer(vlm, "photo.jpg", "What color is the shape?")      # -> "red"
    score_records(vlm, "data/synth_vqa/heldout.json", "data/synth_vqa")   # exact-match accuracy per question

Multiple-choice benchmarks (VMCBench's format) are fastenc.eval.vqa's, which shares `image_pixels` and `answer`.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch

from fastenc.data.transforms import decode_image


def image_pixels(vlm, image) -> torch.Tensor | None:
    """`image` (a path, encoded bytes, or a PIL image; None: no image) -> the run's eval transform of it, [1, 3, S,
    S] on the model's device (and in its dtype), or None. CorruptSample for bytes that do not decode."""
    if image is None:
        return None
    if isinstance(image, str):
        with open(image, "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray)):
        image = decode_image(bytes(image))
    weight = next(vlm.model.parameters())
    return vlm.image_transform(image).unsqueeze(0).to(weight.device, weight.dtype)


def answer(vlm, image, question: str, *, max_new_tokens: int = 32) -> str:
    """The run's greedy answer to `question` about `image` (a path, bytes, or a PIL image; None: text only)."""
    pixels = image_pixels(vlm, image)
    ids = vlm.conversations.prompt(question, has_image=pixels is not None)
    new = vlm.model.generate(torch.tensor([ids], device=_device(vlm)), pixels, max_new_tokens=max_new_tokens,
                             eos_token_id=vlm.tokenizer.eos_token_id)
    return vlm.tokenizer.decode(new, skip_special_tokens=True).strip()


def _device(vlm) -> torch.device:
    return next(vlm.model.parameters()).device


def score_records(vlm, records_path: str, image_folder: str, *, limit: int | None = None) -> dict:
    """Exact-match accuracy (case and trailing period ignored) of the run's answer to every question of a LLaVA
    records file, grouped by question; {question: {"correct", "total", "accuracy"}, "all": {...}}."""
    with open(records_path) as f:
        records = json.load(f)[:limit]
    counts = defaultdict(lambda: [0, 0])
    for record in records:
        turns = record["conversations"]
        image = os.path.join(image_folder, record["image"]) if record.get("image") else None
        for q, a in zip(turns[0::2], turns[1::2]):
            question = q["value"].replace("<image>", "").strip()
            got = answer(vlm, image, question)
            ok = _normalize(got) == _normalize(a["value"])
            for key in (question, "all"):
                counts[key][0] += ok
                counts[key][1] += 1
    return {k: {"correct": c, "total": n, "accuracy": c / n} for k, (c, n) in counts.items()}


def _normalize(text: str) -> str:
    return text.strip().lower().rstrip(".")
