"""Synthetic vision-language data in LLaVA's own format: an image folder and two JSON files of conversations.

    out/images/000000000.jpg ...   the synthetic shapes of fastenc.datatools.synth (same drawing, same attributes)
    out/captions.json              stage 1: "<image>\\n<a request for a short description>" -> the image's caption
    out/instruct.json              stage 2: two questions per image about its color, shape or word -> short answers
    out/heldout.json               stage 2's questions on images no stage trains on (what `fastenc chat` is tried on)

Every answer is known exactly, so whether a trained VLM reads the image is a count, not an opinion: a color question
has 11 possible answers, so chance is 1/11.
"""

from __future__ import annotations

import io
import os

import numpy as np

from fastenc.datatools.synth import render_sample
from fastenc.utils import atomic

CAPTION_PROMPTS = ("Describe the image briefly.", "Give a short caption for this image.",
                   "What does the image show?", "Summarize the picture in a few words.")
QUESTIONS = {
    "color": ("What color is the shape?", "{color}"),
    "shape": ("What shape is shown?", "{category}"),
    "word": ("What word is written on the shape?", "{word}"),
}


def _qa(kind: str, attrs: dict) -> tuple[str, str]:
    question, answer = QUESTIONS[kind]
    if kind == "word" and attrs["word"] is None:
        return question, "There is no word."
    return question, answer.format(**attrs)


def _conversation(pairs: list[tuple[str, str]]) -> list[dict]:
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return turns


def write_synthetic_llava(out_dir: str, num_samples: int, *, num_heldout: int = 200, image_size: int = 64,
                          seed: int = 0) -> dict:
    """Write the images and the three JSON files (see the module docstring); returns their paths. Images of the
    held-out set are drawn from indices past num_samples, so no stage trains on them."""
    if num_samples <= 0 or num_heldout < 0:
        raise ValueError(f"need num_samples > 0 and num_heldout >= 0, got {num_samples}, {num_heldout}")
    rng = np.random.default_rng(seed)
    captions, instruct, heldout = [], [], []
    for i in range(num_samples + num_heldout):
        img, attrs = render_sample(i, image_size=image_size, seed=seed)
        name = f"images/{i:09d}.jpg"
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        atomic.write_bytes(os.path.join(out_dir, name), buf.getvalue(), fsync=False)
        kinds = [str(k) for k in rng.permutation(list(QUESTIONS))[:2]]
        record = {"id": f"{i:09d}", "image": name, "conversations": _conversation([_qa(k, attrs) for k in kinds])}
        if i >= num_samples:
            heldout.append({**record, "attributes": attrs})
            continue
        prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
        captions.append({"id": f"{i:09d}", "image": name,
                         "conversations": _conversation([(prompt, attrs["caption"])])})
        instruct.append(record)
    paths = {}
    for key, records in (("captions", captions), ("instruct", instruct), ("heldout", heldout)):
        paths[key] = atomic.write_json(os.path.join(out_dir, f"{key}.json"), records, indent=None)
    return paths
