"""Synthetic vision-language data: LLaVA's training format for both stages and a held-out multiple-choice benchmark
in VMCBench's format, all from the synthetic world of fastenc.datatools.synth (same drawing, same attributes).

    out/images/000000000.jpg ...   the images (training ones first, then the held-out ones)
    out/captions.json              stage 1: "<image>\\n<a request for a short description>" -> the image's caption
    out/instruct.json              stage 2: two questions per image, each asked open ("What color is the shape?" ->
                                   "red") or as multiple choice in the benchmark's prompt (-> "B"); with
                                   text_fraction, also text-only records (below)
    out/heldout.json               open questions on held-out images (what `fastenc chat --score` is tried on)
    out/benchmark.jsonl            multiple-choice questions on the held-out images, VMCBench's columns (index,
                                   question, A-D, answer, category, image) plus `type`: `fastenc eval vqa` reads it
    out/manifest.json              written last: the world's version and knobs, the arguments, the item count

Question types (QUESTION_TYPES) and the VMCBench group each stands in for (its `category` column):

    type      VMCBench group  asks                                  options drawn from
    word      ocr             which word is written on the shape    the 20 words
    color     general         the shape's color                     the 11 colors
    shape     general         the shape's category                  the 10 categories
    style     general         the background's pattern              the 6 styles
    count     reason          how many small diamonds the corners   0, 1, 2, 3
                              hold

The wrong options of a question are other values of the same attribute. A question is asked only where the image
answers it (`word` on images with a word). Every answer is known exactly, so whether a VLM reads the image is a count.

Text-only records (text_fraction: the chance that a training image also gets one). Answering a multiple-choice
question with the right option's letter ("symbol binding") is a skill a pretrained LM brings to LLaVA; the CPU
study's LM starts random and does not learn it from the image questions alone (it answers open questions about
color and shape from the image, yet picks letters at chance). So, as LLaVA-1.5 mixes text-only conversations
into stage 2, a text-only record states an image's attributes in words ("The shape is red. ...") and asks two
multiple-choice questions about them: the letter follows from the text. They never mention the image, and their
own random stream leaves the image records as they are without them. Tried on the CPU recipe (text_fraction 1.0,
stage 2 at lr 1e-3 x 600 steps): the LM still picked letters at chance, on these text-only questions too; the CPU
study does not use them (`fastenc eval vqa --mode cloze` measures what such an LM knows).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from fastenc.data.conversation import OPTION_LETTERS, multiple_choice_prompt
from fastenc.datatools.synth import CATEGORIES, COLOR_NAMES, STYLE_ADJECTIVES, STYLES, WORDS, render_sample, world_manifest
from fastenc.utils import atomic

CAPTION_PROMPTS = ("Describe the image briefly.", "Give a short caption for this image.",
                   "What does the image show?", "Summarize the picture in a few words.")
COUNTS = ("0", "1", "2", "3")

# type: (VMCBench group, open question, multiple-choice question, the attribute's values)
QUESTION_TYPES = {
    "word": ("ocr", "What word is written on the shape?", "Which word is written on the shape?", WORDS),
    "color": ("general", "What color is the shape?", "What color is the shape?", COLOR_NAMES),
    "shape": ("general", "What shape is shown?", "Which shape is shown?", CATEGORIES),
    "style": ("general", "What pattern does the background have?", "Which pattern does the background have?",
              tuple(STYLE_ADJECTIVES[s] for s in STYLES)),
    "count": ("reason", "How many small diamonds are in the corners?",
              "How many small diamonds are in the corners of the image?", COUNTS),
}
LETTERS = OPTION_LETTERS
# type: the attribute stated in words, for text-only records
FACTS = {
    "word": 'The word "{}" is written on the shape.',
    "color": "The shape is {}.",
    "shape": "The shape is {}.",
    "style": "The background is {}.",
    "count": "Small diamonds in the corners: {}.",
}


def answer_of(kind: str, attrs: dict) -> str | None:
    """The answer to a question of type `kind` about the image with these attributes; None where the image does not
    answer it (no word; a shape too near a middle line for its quadrant to be clear)."""
    if kind == "word":
        return attrs["word"]
    if kind == "color":
        return attrs["color"]
    if kind == "shape":
        return attrs["category"]
    if kind == "style":
        return STYLE_ADJECTIVES[attrs["style"]]
    if kind == "count":
        return str(attrs["num_marks"])
    raise ValueError(f"unknown question type {kind!r}; known: {', '.join(QUESTION_TYPES)}")


def multiple_choice(kind: str, answer: str, rng: np.random.Generator) -> dict:
    """A multiple-choice item {question, A, B, C, D, answer}: the right answer at a random letter and three other
    values of the same attribute."""
    values = QUESTION_TYPES[kind][3]
    wrong = [v for v in values if v != answer]
    options = [answer] + [wrong[i] for i in rng.choice(len(wrong), len(LETTERS) - 1, replace=False)]
    order = rng.permutation(len(LETTERS))
    item = {"question": QUESTION_TYPES[kind][2]}
    item.update({LETTERS[j]: options[k] for j, k in enumerate(order)})
    item["answer"] = LETTERS[int(np.argmin(order))]  # where option 0 (the right one) went
    return item


def mc_prompt(item: dict) -> str:
    """The benchmark's prompt for a multiple-choice item, exactly as `fastenc eval vqa` asks it."""
    return multiple_choice_prompt(item["question"], {k: item[k] for k in LETTERS})


def _conversation(pairs: list[tuple[str, str]], *, image: bool = True) -> list[dict]:
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 and image else "") + q},
                  {"from": "gpt", "value": a}]
    return turns


def _training_pairs(attrs: dict, rng: np.random.Generator, mc_fraction: float) -> list[tuple[str, str]]:
    """Two (question, answer) pairs about one training image, of two different answerable types; each asked as
    multiple choice with probability mc_fraction, else open."""
    kinds = [k for k in rng.permutation(list(QUESTION_TYPES)) if answer_of(str(k), attrs) is not None][:2]
    pairs = []
    for kind in map(str, kinds):
        answer = answer_of(kind, attrs)
        if rng.random() < mc_fraction:
            item = multiple_choice(kind, answer, rng)
            pairs.append((mc_prompt(item), item["answer"]))
        else:
            pairs.append((QUESTION_TYPES[kind][1], answer))
    return pairs


def text_only_record(attrs: dict, rng: np.random.Generator) -> dict:
    """A conversation without an image: the attributes an image answers, stated in words in a random order, then
    multiple-choice questions about two of them (each answer a letter)."""
    answered = [(k, answer_of(k, attrs)) for k in QUESTION_TYPES if answer_of(k, attrs) is not None]
    stated = [(k, ("an " if a[0] in "aeiou" else "a ") + a if k == "shape" else a) for k, a in answered]
    facts = " ".join(FACTS[k].format(a) for k, a in (stated[i] for i in rng.permutation(len(stated))))
    pairs = []
    for i in rng.choice(len(answered), 2, replace=False):
        item = multiple_choice(*answered[i], rng)
        pairs.append((mc_prompt(item), item["answer"]))
    pairs[0] = (facts + "\n" + pairs[0][0], pairs[0][1])
    return {"conversations": _conversation(pairs, image=False)}


def write_synthetic_vqa(out_dir: str, num_samples: int, *, num_heldout: int = 300, image_size: int = 64,
                        seed: int = 0, mc_fraction: float = 0.5, text_fraction: float = 0.0) -> dict:
    """Write the images, the three LLaVA JSON files and benchmark.jsonl (see the module docstring); returns their
    paths. Held-out images are drawn from indices past num_samples, so no stage trains on them; each held-out image
    gets every question type it answers, in the benchmark and (open) in heldout.json. text_fraction: the chance
    that a training image also gets a text-only record in instruct.json (text_only_record)."""
    if num_samples <= 0 or num_heldout < 0:
        raise ValueError(f"need num_samples > 0 and num_heldout >= 0, got {num_samples}, {num_heldout}")
    for name, p in (("mc_fraction", mc_fraction), ("text_fraction", text_fraction)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    rng = np.random.default_rng(seed)
    text_rng = np.random.default_rng([seed, 1])  # its own stream: the image records do not depend on text_fraction
    captions, instruct, heldout, benchmark = [], [], [], []
    for i in range(num_samples + num_heldout):
        img, attrs = render_sample(i, image_size=image_size, seed=seed)
        name = f"images/{i:09d}.jpg"
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        atomic.write_bytes(os.path.join(out_dir, name), buf.getvalue(), fsync=False)
        if i < num_samples:
            prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
            captions.append({"id": f"{i:09d}", "image": name,
                             "conversations": _conversation([(prompt, attrs["caption"])])})
            instruct.append({"id": f"{i:09d}", "image": name,
                             "conversations": _conversation(_training_pairs(attrs, rng, mc_fraction))})
            if text_fraction > 0 and text_rng.random() < text_fraction:
                instruct.append({"id": f"text-{i:09d}", **text_only_record(attrs, text_rng)})
            continue
        answered = [(k, answer_of(k, attrs)) for k in QUESTION_TYPES if answer_of(k, attrs) is not None]
        heldout.append({"id": f"{i:09d}", "image": name, "attributes": attrs,
                        "conversations": _conversation([(QUESTION_TYPES[k][1], a) for k, a in answered])})
        for kind, answer in answered:
            benchmark.append({"index": len(benchmark), **multiple_choice(kind, answer, rng),
                              "category": QUESTION_TYPES[kind][0], "type": kind, "image": name})
    paths = {}
    for key, records in (("captions", captions), ("instruct", instruct), ("heldout", heldout)):
        paths[key] = atomic.write_json(os.path.join(out_dir, f"{key}.json"), records, indent=None)
    paths["benchmark"] = atomic.write_text(os.path.join(out_dir, "benchmark.jsonl"),
                                           "".join(json.dumps(r) + "\n" for r in benchmark))
    paths["manifest"] = atomic.write_json(os.path.join(out_dir, "manifest.json"), {  # last: marks a finished set
        "generator": "fastenc.datatools.synth_vqa", **world_manifest(), "num_samples": num_samples,
        "num_heldout": num_heldout, "image_size": image_size, "seed": seed, "mc_fraction": mc_fraction,
        "text_fraction": text_fraction,
        "num_benchmark_items": len(benchmark)})
    return paths
