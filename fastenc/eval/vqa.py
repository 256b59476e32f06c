"""Multiple-choice visual question answering in VMCBench's format: a vision-language run's accuracy, with chance and
bootstrap confidence intervals, overall, per category, per VMCBench group and per any extra column.

    items = load_benchmark("vmcbench/data/test-00000-of-00001.parquet")      # .parquet, .tsv, .jsonl or .json
    vlm = load_vlm("runs/llava_tiny_stage2")                                  # fastenc.run.weights
    out = evaluate_vqa(vlm, items, mode="likelihood", by=["type"])           # {"predictions": [...], "summary": {...}}
    run_vqa(["stage2=runs/llava_tiny_stage2"], "bench.jsonl", "eval/vqa")   # results.json, report.md, predictions

Formats (one item a row; the columns VMCBench releases):
    index (optional: the row number), question, A, B, C, D (an empty or missing option is left out of the prompt and
    of the choices), answer (the letter), category (the source subset, or a group name), image; any other column is
    kept as a string (e.g. "type", for `by`).
    .parquet  the Hugging Face release (suyc21/VMCBench, data/{dev,test}-*.parquet): image a struct {bytes, path}
              (the HF Image feature), raw bytes, or a path; needs pyarrow.
    .tsv      VLMEvalKit's: image a base64 string (or, as VLMEvalKit does for repeated images, the index of the row
              that holds it).
    .jsonl    one record a line (fastenc's own synthetic benchmarks), image a path relative to the file's folder;
    .json     a list of such records.
`images=DIR` resolves image paths against DIR instead of the file's folder. Images are kept encoded (bytes or a
path) and decoded when their item is scored.

The prompt is the paper's (`prompt_text`), asked as the user's turn after the image, in the run's chat format.
Modes:
    likelihood  (default) for each option letter, the log-likelihood of the assistant's whole answer being that
                letter: the conversation [(prompt, letter)] rendered and labelled exactly as training renders it
                (fastenc.data.conversation.ConversationEncoder, so the answer's end-of-turn marker counts too), the
                log-probabilities of its labelled tokens summed; the options of one question run as one padded
                batch. The prediction is the argmax (ties: the first letter). Sequences are not cut at the run's
                max_length (a cut would drop the answer); those longer than it are counted (`over_max_length`).
    cloze       the option texts instead of their letters (lm-evaluation-harness's and OLMES's "cloze formulation"
                of multiple choice, the one small LMs are scored with): the user's turn is the bare question (no
                option list), and each option is scored by the log-likelihood of the assistant's answer being its
                text, divided by the text's length in characters; the prediction is the best option's letter.
                It asks whether the model knows the answer without asking it to bind the answer to a letter
                ("symbol binding", which a small or untrained LM lacks: then `likelihood` is at chance whatever
                the image tells it). Not the paper's protocol; report it beside `likelihood`.
    generate    the run's greedy answer (fastenc.eval.chat.answer), parsed to a letter (`parse_letter`); an answer
                that names no option counts as wrong and as `unparsed`.
An item that cannot be scored (its image does not decode, its prompt does not fit) counts as wrong and in `errors`,
with the reason in its prediction record.

Summary (`summarize`): accuracy overall, per category, per VMCBench group (GROUPS) and per `by` column, each with
n, correct, chance (the expected accuracy of uniform guessing: the mean over items of 1 / number of options) and a
95% percentile bootstrap interval over the items of that cell (for a 0/1 score the number correct in a resample of
n items is Binomial(n, accuracy), drawn directly; deterministic for a seed).
"""

from __future__ import annotations

import base64
import binascii
import copy
import csv
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

from fastenc.data.conversation import OPTION_LETTERS, multiple_choice_prompt
from fastenc.eval.features import EvalDataError
from fastenc.eval.results import display_path, finite, parse_source
from fastenc.utils import atomic

log = logging.getLogger(__name__)

LETTERS = OPTION_LETTERS
REQUIRED = ("question", *LETTERS, "answer", "category", "image")
FORMATS = (".parquet", ".tsv", ".jsonl", ".json")
MODES = ("likelihood", "cloze", "generate")

GROUPS = {
    "general": ("SEEDBench", "MMStar", "A-OKVQA", "VizWiz", "MMVet", "VQAv2", "OKVQA"),
    "reason": ("MMMU", "MathVista", "ScienceQA", "RealWorldQA", "GQA", "MathVision"),
    "ocr": ("TextVQA", "OCRVQA"),
    "doc": ("AI2D", "ChartQA", "DocVQA", "InfoVQA", "TableVQABench"),
}
"""VMCBench's four groups of its 20 source subsets (the category column); anything else is "other"."""
GROUP_ORDER = (*GROUPS, "other")


class VQAFormatError(EvalDataError):
    """A benchmark file that cannot be read as multiple-choice items; the message names the file and what to fix."""


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", str(name)).lower()


_GROUP_OF = {_key(subset): group for group, subsets in GROUPS.items() for subset in subsets}
_GROUP_OF.update({group: group for group in GROUPS})


def group_of(category: str) -> str:
    """A category's VMCBench group: its subset's (case, '-' and '_' ignored), itself if it is a group name, else
    "other"."""
    return _GROUP_OF.get(_key(category), "other")


@dataclass
class VQAItem:
    index: object
    """The row's `index` (an int where it is one), else its row number."""
    question: str
    options: dict
    """{letter: text} of the non-empty options, in letter order."""
    answer: str
    category: str
    image: object = None
    """Encoded image bytes, a file path, or None (a text-only question)."""
    extra: dict = field(default_factory=dict)
    """The other columns, as strings."""
    row: int = 0

    @property
    def group(self) -> str:
        return group_of(self.category)


def prompt_text(item: VQAItem) -> str:
    """The paper's prompt: "Question: ...\\nOptions:\\nA. ...\\n...\\nAnswer with the option's letter from the given
    choices directly." (empty options left out)."""
    return multiple_choice_prompt(item.question, item.options)


# ---------------------------------------------------------------------------------------------------------------
# Reading benchmark files


def load_benchmark(path: str, *, image_root: str | None = None, limit: int | None = None) -> list[VQAItem]:
    """The items of a benchmark file (.parquet, .tsv, .jsonl, .json; see the module docstring), the first `limit`
    only if given. VQAFormatError for a file it cannot use: a missing column (named, with the columns found), an
    answer that is not the letter of a non-empty option, an image that is missing or not decodable base64 (the row
    named)."""
    if not os.path.isfile(path):
        raise VQAFormatError(f"benchmark file {path!r} not found")
    ext = next((e for e in FORMATS if path.lower().endswith(e)), None)
    if ext is None:
        raise VQAFormatError(f"{path}: unknown benchmark format (known: {', '.join(FORMATS)})")
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    if image_root is not None and not os.path.isdir(image_root):
        raise VQAFormatError(f"image folder {image_root!r} not found")
    columns, rows = {".parquet": _read_parquet, ".tsv": _read_tsv, ".jsonl": _read_jsonl,
                     ".json": _read_json}[ext](path, limit)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise VQAFormatError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(repr, missing))} (needs {', '.join(REQUIRED)}, index optional; found: "
                             f"{', '.join(map(repr, columns)) or 'none'})")
    if ext == ".tsv":
        _resolve_tsv_image_references(rows)
    items = [_item(path, i, row, root, ext) for i, row in enumerate(rows)]
    if not items:
        raise VQAFormatError(f"{path}: no items")
    return items


def _read_parquet(path, limit):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise VQAFormatError(f"reading {path} needs pyarrow, an optional dependency: pip install pyarrow ({e})") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's own errors (ArrowInvalid, OSError) for a file that is not parquet
        raise VQAFormatError(f"{path}: not a readable parquet file ({e})") from e
    if limit is not None:
        table = table.slice(0, limit)
    columns = list(table.column_names)
    data = {name: table.column(name).to_pylist() for name in columns}
    return columns, [{name: data[name][i] for name in columns} for i in range(table.num_rows)]


def _read_tsv(path, limit):
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # base64 images are far longer than csv's default cap
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            if limit is not None and len(rows) >= limit:
                break
            rows.append(row)
    return columns, rows


def _read_jsonl(path, limit):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise VQAFormatError(f"{path}: line {n} is not JSON ({e})") from e
            if not isinstance(rows[-1], dict):
                raise VQAFormatError(f"{path}: line {n} is a {type(rows[-1]).__name__}, not a record")
    return _record_columns(rows), rows


def _read_json(path, limit):
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise VQAFormatError(f"{path}: not JSON ({e})") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise VQAFormatError(f"{path}: a .json benchmark is a list of records ({{question, A, B, C, D, answer, "
                             "category, image}})")
    rows = rows[:limit]
    return _record_columns(rows), rows


def _record_columns(rows) -> list[str]:
    """The keys of the records, in order of appearance (a key one record lacks is an empty value there)."""
    return list(dict.fromkeys(k for row in rows for k in row))


def _resolve_tsv_image_references(rows) -> None:
    """VLMEvalKit's TSVs store a repeated image once: another row's image cell holds that row's index (<= 64 chars)."""
    by_index = {str(r.get("index")): r.get("image") for r in rows if r.get("index") not in (None, "")}
    for row in rows:
        image = row.get("image")
        if image and len(image) <= 64 and image in by_index and len(by_index[image] or "") > 64:
            row["image"] = by_index[image]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and not value.strip())


def _text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a numeric option (pandas reads "3" as 3.0)
    return str(value).strip()


def _item(path: str, i: int, row: dict, root: str, ext: str) -> VQAItem:
    index = row.get("index")
    if _missing(index):
        index = i
    elif isinstance(index, str) and re.fullmatch(r"-?\d+", index.strip()):
        index = int(index)
    where = f"{path}: row {i} (index {index})"
    options = {letter: _text(row[letter]) for letter in LETTERS if not _missing(row.get(letter))}
    answer = "" if _missing(row.get("answer")) else _text(row["answer"]).upper()
    if answer not in options:
        raise VQAFormatError(f"{where}: answer {row.get('answer')!r} is not the letter of one of its non-empty "
                             f"options ({', '.join(options) or 'none'})")
    if _missing(row.get("question")):
        raise VQAFormatError(f"{where}: the question is empty")
    extra = {k: _text(v) for k, v in row.items()
             if k not in REQUIRED and k != "index" and not _missing(v) and isinstance(v, (str, int, float, bool))}
    return VQAItem(index=index, question=_text(row["question"]), options=options, answer=answer,
                   category="" if _missing(row.get("category")) else _text(row["category"]),
                   image=_image(row.get("image"), root, ext, where), extra=extra, row=i)


def _image(value, root: str, ext: str, where: str):
    """A cell of the image column -> encoded bytes, an existing file's path, or None (no image)."""
    if isinstance(value, dict):  # the HF Image feature: {bytes, path}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None
    if _missing(value):
        return None
    if not isinstance(value, str):
        raise VQAFormatError(f"{where}: image is a {type(value).__name__}, not bytes, a path or base64")
    if ext == ".tsv":
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise VQAFormatError(f"{where}: the image is not base64 ({e}; VLMEvalKit's TSVs hold base64-encoded "
                                 "images, or the index of the row that holds the image)") from e
    full = os.path.join(root, value)
    if not os.path.isfile(full):
        raise VQAFormatError(f"{where}: image {value!r} not found (looked in {root}; --images DIR to look elsewhere)")
    return full


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def parse_letter(text: str, options: dict) -> str | None:
    """The option a generated answer names, or None: a bare letter ("B", "b"), "B.", "(B)", "B) ...", "B. text",
    "Answer: B", "The answer is B", or text equal to one option's text (case, surrounding spaces and a final period
    ignored). Only letters of `options` count."""
    t = text.strip()
    t = re.sub(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option)\s*(?:is|:)?\s*:?\s*", "", t, flags=re.IGNORECASE)
    m = (re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", t)
         or re.match(r"\(([A-Za-z])\)(?:\s|$)", t)
         or re.match(r"([A-Z])[.:)]\s", t))
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    norm = _normalize(text)
    hits = [letter for letter, option in options.items() if _normalize(option) == norm]
    return hits[0] if len(hits) == 1 else None


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def _conversations(vlm):
    """The run's ConversationEncoder, uncut: max_length raised to the LM's position limit (a cut answer cannot be
    scored; the model may still do poorly past the length it trained at, which `over_max_length` counts)."""
    enc = copy.copy(vlm.conversations)
    limit = getattr(getattr(vlm.model.lm, "config", None), "max_position_embeddings", None)
    enc.max_length = max(int(enc.max_length), int(limit or 0))
    return enc


def option_logliks(vlm, item: VQAItem, *, conversations=None, pixels=None) -> dict:
    """{letter: log p(the assistant's answer is exactly `letter` | image, prompt)} for each option of `item`: the
    conversation [(prompt_text(item), letter)] as training renders it, the log-probabilities of its labelled tokens
    (the letter and the end-of-turn marker) summed; one padded forward pass for all options."""
    from fastenc.eval.chat import image_pixels

    if pixels is None:
        pixels = image_pixels(vlm, item.image)
    return _score_options(vlm, item, conversations or _conversations(vlm), pixels)[0]


def _score_answers(vlm, prompt: str, answers: dict, enc, pixels) -> tuple[dict, int]:
    """({key: log p(the assistant's answer is answers[key] | image, prompt)}, the longest sequence's length in
    tokens): the conversations [(prompt, answer)] rendered as training renders them, in one padded batch."""
    rows = [enc({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]},
                has_image=pixels is not None) for answer in answers.values()]
    return dict(zip(answers, sequence_logliks(vlm.model, rows, pixels))), max(len(ids) for ids, _ in rows)


def _score_options(vlm, item: VQAItem, enc, pixels) -> tuple[dict, int]:
    """(option_logliks, the longest option sequence's length in tokens): the likelihood mode."""
    return _score_answers(vlm, prompt_text(item), {letter: letter for letter in item.options}, enc, pixels)


def _score_option_texts(vlm, item: VQAItem, enc, pixels) -> tuple[dict, int]:
    """({letter: log p(the answer is the option's text | image, bare question) / its length in characters}, the
    longest sequence's length in tokens): the cloze mode."""
    logliks, length = _score_answers(vlm, item.question, item.options, enc, pixels)
    return {letter: ll / max(len(item.options[letter]), 1) for letter, ll in logliks.items()}, length


def sequence_logliks(model, rows, pixels=None) -> list[float]:
    """[sum of log p(label token | the tokens before it) over the labelled positions] of each (ids, labels) row,
    the rows right-padded into one batch; `pixels` [1, 3, S, S]: the image every row shows (None: text only)."""
    import torch

    from fastenc.data.conversation import IGNORE

    device = next(model.parameters()).device
    pad = 0 if model.image_token_id != 0 else 1  # any id but the image's: masked, its logits unused
    n, length = len(rows), max(len(ids) for ids, _ in rows)
    ids = torch.full((n, length), pad, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, :len(i)], labels[r, :len(lab)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    images = None if pixels is None else pixels.expand(n, *pixels.shape[1:])
    with torch.no_grad():
        logits = model.lm(inputs_embeds=model.embed(ids, images), attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        scored = target != IGNORE
        logp = torch.log_softmax(logits[scored].float(), dim=-1).gather(-1, target[scored].unsqueeze(-1))[:, 0]
        row_of = scored.nonzero()[:, 0]
        out = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, row_of, logp.double())
    return out.tolist()


def evaluate_vqa(vlm, items: list[VQAItem], mode: str = "likelihood", *, by=(), bootstrap: int = 1000,
                 seed: int = 0, max_new_tokens: int = 32, progress: bool = True, desc: str = "vqa") -> dict:
    """Score a loaded vision-language run (fastenc.run.weights.load_vlm) on `items`:
    {"mode", "predictions": [one record per item: index, category, group, the `by` columns, answer, prediction,
    correct, num_options, and "loglik" {letter: float} (likelihood; cloze: per character) or "text" + "parsed"
    (generate); "error" for an
    item that could not be scored], "summary": summarize(...)}."""
    from tqdm.auto import tqdm

    from fastenc.data.transforms import CorruptSample
    from fastenc.eval.chat import answer, image_pixels

    if mode not in MODES:
        raise EvalDataError(f"unknown vqa mode {mode!r} (known: {', '.join(MODES)})")
    by = check_by(items, by)
    enc = _conversations(vlm)
    train_length = int(vlm.conversations.max_length)
    preds = []
    for item in tqdm(items, desc=f"{desc} ({mode})", unit="q", disable=not progress):
        rec = {"index": item.index, "category": item.category, "group": item.group,
               **{col: item.extra.get(col, "") for col in by}, "answer": item.answer, "prediction": None,
               "correct": False, "num_options": len(item.options)}
        try:
            if mode in ("likelihood", "cloze"):
                score = _score_options if mode == "likelihood" else _score_option_texts
                rec["loglik"], length = score(vlm, item, enc, image_pixels(vlm, item.image))
                rec["prediction"] = max(rec["loglik"], key=rec["loglik"].get)  # max keeps the first of ties
                rec["over_max_length"] = length > train_length
            else:
                rec["text"] = answer(vlm, item.image, prompt_text(item), max_new_tokens=max_new_tokens)
                rec["prediction"] = parse_letter(rec["text"], item.options)
                rec["parsed"] = rec["prediction"] is not None
        except (CorruptSample, OSError) as e:  # an image that does not decode or open, a prompt that does not fit
            rec["error"] = str(e)
        rec["correct"] = rec["prediction"] == item.answer
        preds.append(rec)
    return {"mode": mode, "predictions": preds,
            "summary": summarize(preds, by=by, bootstrap=bootstrap, seed=seed)}


def check_by(items: list[VQAItem], by) -> tuple[str, ...]:
    """The `by` columns ("type,color" or a list), each checked to be an extra column of some item."""
    by = tuple(_split(by))
    found = set().union(*(item.extra for item in items)) if items else set()
    unknown = [col for col in by if col not in found]
    if unknown:
        raise VQAFormatError(f"by column(s) {', '.join(map(repr, unknown))} not in the benchmark (its extra columns: "
                             f"{', '.join(sorted(found)) or 'none'})")
    return by


def _split(by) -> list[str]:
    """"type,color" / ["type", "color"] / None -> ["type", "color"]."""
    if not by:
        return []
    if isinstance(by, str):
        by = [by]
    return [part.strip() for entry in by for part in str(entry).split(",") if part.strip()]


def summarize(preds: list[dict], *, by=(), bootstrap: int = 1000, seed: int = 0) -> dict:
    """Accuracy tables of prediction records (each with "correct", "num_options", "category", optionally "group"
    and the `by` columns): {"overall": cell, "category": {name: cell}, "group": {name: cell}, "by": {column:
    {value: cell}}, "errors", "unparsed", "over_max_length"}, cell = {"n", "correct", "accuracy", "chance",
    "ci": [low, high]} (95% percentile bootstrap with `bootstrap` resamples, None with 0)."""
    import numpy as np

    def cell(recs):
        n = len(recs)
        correct = sum(bool(r["correct"]) for r in recs)
        acc = correct / n
        ci = None
        if bootstrap:
            rng = np.random.default_rng(seed)
            draws = rng.binomial(n, acc, size=int(bootstrap)) / n  # = the accuracy of n items resampled
            ci = [float(v) for v in np.percentile(draws, [2.5, 97.5])]
        return {"n": n, "correct": correct, "accuracy": acc, "chance": sum(1 / r["num_options"] for r in recs) / n,
                "ci": ci}

    def table(key):
        cells = {}
        for r in preds:
            cells.setdefault(str(key(r)), []).append(r)
        return cells

    by = _split(by)
    groups = table(lambda r: r.get("group") or group_of(r["category"]))
    categories = table(lambda r: r["category"])
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    return {
        "overall": cell(preds) if preds else None,
        "category": {c: cell(categories[c]) for c in sorted(categories, key=lambda c: (order[group_of(c)], c))},
        "group": {g: cell(groups[g]) for g in GROUP_ORDER if g in groups},
        "by": {col: {v: cell(recs) for v, recs in sorted(table(lambda r: r.get(col, "")).items())} for col in by},
        "errors": sum("error" in r for r in preds),
        "unparsed": sum(r.get("parsed") is False for r in preds),
        "over_max_length": sum(bool(r.get("over_max_length")) for r in preds),
    }


# ---------------------------------------------------------------------------------------------------------------
# Runs, files, report


def is_vlm_run(source: str) -> bool:
    """Whether `source` is a vision-language run dir (its export has the LM: fastenc.run.layout.LANGUAGE_MODEL)."""
    from fastenc.run.layout import RunDir

    return os.path.isdir(source) and os.path.isdir(RunDir(source).language_model)


def load_vlm_run(source: str, device: str = "cpu"):
    """fastenc.run.weights.load_vlm on `device`, its errors as EvalDataError."""
    from fastenc.config import ConfigError
    from fastenc.run.weights import load_vlm

    try:
        vlm = load_vlm(source)
    except (FileNotFoundError, ConfigError, ValueError, OSError) as e:
        raise EvalDataError(f"{source}: {e}") from e
    vlm.model.to(device)
    return vlm


def modes_of(mode) -> tuple[str, ...]:
    """"likelihood", "likelihood,cloze" (or a list), "both" (likelihood and generate), "all" -> the modes to run,
    in MODES order."""
    names = {"both": ["likelihood", "generate"], "all": list(MODES)}
    asked = [m for part in _split(mode) for m in names.get(part, [part])]
    unknown = [m for m in asked if m not in MODES]
    if unknown or not asked:
        raise EvalDataError(f"unknown vqa mode {mode!r} (known: {', '.join(MODES)}; a comma list of them, both "
                            "(likelihood and generate) or all)")
    return tuple(m for m in MODES if m in asked)


def score_run(vlm, items, modes, *, by=(), bootstrap=1000, seed=0, max_new_tokens=32, name="vqa",
              predictions_path: str | None = None, progress: bool = True) -> dict:
    """{mode: summary} of one loaded run, its predictions written as JSON lines (one per item and mode, with
    "mode") to predictions_path when given."""
    out, lines = {}, []
    for mode in modes:
        res = evaluate_vqa(vlm, items, mode, by=by, bootstrap=bootstrap, seed=seed, max_new_tokens=max_new_tokens,
                           progress=progress, desc=name)
        out[mode] = res["summary"]
        lines += [json.dumps(finite({"mode": mode, **p}), allow_nan=False) for p in res["predictions"]]
    if predictions_path:
        atomic.write_text(predictions_path, "".join(line + "\n" for line in lines))
    return out


def suite_protocol(runs, args: dict, out_dir: str, device: str = "cpu") -> dict:
    """The `vqa` protocol of `fastenc eval` suites (fastenc.eval.suite): {run name: {mode: summary}} for the runs
    that are vision-language run dirs, {"skipped": "not a vision-language run"} for the others; predictions in
    OUT_DIR/predictions-<run>.jsonl. args: benchmark (required), images, mode, limit, by, bootstrap, seed,
    max_new_tokens."""
    modes = modes_of(args.get("mode", "likelihood"))
    items = load_benchmark(args["benchmark"], image_root=args.get("images"), limit=args.get("limit"))
    by = check_by(items, args.get("by"))
    out = {}
    for run in runs:
        if not is_vlm_run(run.source):
            out[run.name] = {"skipped": "not a vision-language run"}
            continue
        os.makedirs(out_dir, exist_ok=True)
        vlm = load_vlm_run(run.source, device)
        out[run.name] = score_run(vlm, items, modes, by=by, bootstrap=int(args.get("bootstrap", 1000)),
                                  seed=int(args.get("seed", 0)), max_new_tokens=int(args.get("max_new_tokens", 32)),
                                  name=run.name,
                                  predictions_path=os.path.join(out_dir, f"predictions-{_file_name(run.name)}.jsonl"))
        del vlm
    return out


def run_vqa(sources: list[str], benchmark: str, out_dir: str, *, images: str | None = None,
            mode: str = "likelihood", limit: int | None = None, by=(), bootstrap: int = 1000, seed: int = 0,
            max_new_tokens: int = 32, device: str = "cpu", command: str | None = None,
            progress: bool = True) -> dict:
    """Score every vision-language run of `sources` (run dirs, each may be NAME=RUN_DIR) on a benchmark file; write
    OUT/results.json, OUT/report.md and OUT/predictions-<run>.jsonl. EvalDataError (before any scoring) for a
    benchmark it cannot read, a `by` column it lacks, or a source that is not a finished vision-language run."""
    from fastenc.utils.provenance import git_revision

    modes = modes_of(mode)
    items = load_benchmark(benchmark, image_root=images, limit=limit)
    by = check_by(items, by)
    named = []
    for source in sources:
        name, src = parse_source(source)
        if not is_vlm_run(src):
            raise EvalDataError(f"{src!r} is not a vision-language run dir (no exported language model, "
                                "export/lm: a llava run writes it when it finishes)")
        named.append((name or _run_name(src), src))
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise EvalDataError(f"two runs share a name ({names}): name them on the command line, NAME=RUN_DIR")
    os.makedirs(out_dir, exist_ok=True)
    results = {"benchmark": display_path(benchmark), "num_items": len(items), "modes": list(modes), "by": list(by),
               "bootstrap": bootstrap, "seed": seed, "runs": {n: s for n, s in named},
               "made_by": {"command": command, "git": git_revision(), "device": device,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
               "results": {}}
    for name, src in named:
        vlm = load_vlm_run(src, device)
        path = os.path.join(out_dir, f"predictions-{_file_name(name)}.jsonl")
        results["results"][name] = score_run(vlm, items, modes, by=by, bootstrap=bootstrap, seed=seed,
                                             max_new_tokens=max_new_tokens, name=name, predictions_path=path,
                                             progress=progress)
        del vlm
    atomic.write_json(os.path.join(out_dir, "results.json"), finite(results), allow_nan=False)
    atomic.write_text(os.path.join(out_dir, "report.md"), render_report(results))
    return results


def _run_name(run_dir: str) -> str:
    from fastenc.config import ConfigError
    from fastenc.run.configs import load_config_or_run

    try:
        return load_config_or_run(run_dir).run.name
    except ConfigError:
        return os.path.basename(os.path.normpath(run_dir))


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", name)


# The three helpers below are fastenc.eval.suite's (which imports this module for its vqa protocol, so this one
# cannot import it without an import cycle): NAME=SOURCE parsing, NaN -> null, and report paths.








def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}"


def _cell_text(cell) -> str:
    if not cell:
        return "-"
    ci = cell.get("ci")
    return _pct(cell["accuracy"]) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")


_TABLES = (("group", "VMCBench group"), ("category", "category"))


def render_tables(results: dict) -> list[str]:
    """Markdown lines: one table per grouping (VMCBench group, category, each `by` column), rows the runs (run
    (mode) with several modes), columns the cells + overall, accuracy % [95% CI], a chance row. `results`:
    {run: {mode: summary}} (a run may be {"skipped": why} instead)."""
    scored = {run: r for run, r in results.items() if "skipped" not in r}
    lines = []
    rows = [(f"{run} ({mode})" if len(r) > 1 else run, s) for run, r in scored.items() for mode, s in r.items()]
    if not rows:
        lines.append("no run scored")
    else:
        tables = [(key, title, lambda s, key=key: s.get(key) or {}) for key, title in _TABLES]
        tables += [(f"by:{col}", col, lambda s, col=col: (s.get("by") or {}).get(col) or {})
                   for col in dict.fromkeys(c for _, s in rows for c in s.get("by") or {})]
        shown = {}  # the cells of each table drawn so far: a grouping equal to one above is named, not repeated
        for _, title, cells_of in tables:
            same = json.dumps([cells_of(s) for _, s in rows], sort_keys=True)
            if same in shown:
                lines += ["", f"**by {title}**: the same cells as by {shown[same]}"]
                continue
            shown[same] = title
            keys = list(dict.fromkeys(k for _, s in rows for k in cells_of(s)))
            first = {k: next(cells_of(s)[k] for _, s in rows if k in cells_of(s)) for k in keys}
            overall = next((s["overall"] for _, s in rows if s.get("overall")), None)
            heads = [f"{k or '(none)'} (n={first[k]['n']})" for k in keys] + [
                f"overall (n={overall['n'] if overall else 0})"]
            lines += ["", f"**by {title}**", "", "| run | " + " | ".join(heads) + " |",
                      "| --- |" + " --- |" * len(heads)]
            for label, s in rows:
                cells = [_cell_text(cells_of(s).get(k)) for k in keys] + [_cell_text(s.get("overall"))]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("| *chance* | " + " | ".join(_pct(first[k]["chance"]) for k in keys)
                         + f" | {_pct(overall['chance']) if overall else 'n/a'} |")
        lines += ["", "accuracy %, [95% bootstrap interval over the items]; chance: uniform guessing among each "
                  "question's options"]
        for label, s in rows:
            notes = [f"{s[k]} {what}" for k, what in (
                ("errors", "item(s) not scored (see the predictions' `error`), counted wrong"),
                ("unparsed", "generated answer(s) naming no option, counted wrong"),
                ("over_max_length", "item(s) longer than the run's training max_length")) if s.get(k)]
            if notes:
                lines.append(f"{label}: " + "; ".join(notes))
    for run, r in results.items():
        if "skipped" in r:
            lines.append(f"{run}: skipped ({r['skipped']})")
    return lines


def render_report(results: dict) -> str:
    """report.md of run_vqa."""
    lines = [f"# Multiple-choice VQA: `{results['benchmark']}`", ""]
    made = results.get("made_by") or {}
    if made:
        lines += [f"Made by `{made.get('command') or 'fastenc.eval.vqa.run_vqa'}` at git {made.get('git')} on "
                  f"{made.get('device')}, {made.get('time')}.", ""]
    lines += [f"{results['num_items']} items; mode {', '.join(results['modes'])} (fastenc/eval/README.md: the prompt "
              "and the modes); predictions in predictions-<run>.jsonl.", "", "| run | source |", "| --- | --- |"]
    lines += [f"| {n} | `{s}` |" for n, s in results["runs"].items()]
    lines += render_tables(results["results"])
    return "\n".join(lines) + "\n"
