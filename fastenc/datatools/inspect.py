"""`fastenc data inspect`: look at a shard set before training on it (counts, sizes, captions, a contact sheet).

One sequential pass over the shards (webdataset grouping: consecutive members sharing the key before the first
dot of the basename are one sample) counts every sample and caption; a reservoir sample of `num_samples` samples
(seeded, so the same seed shows the same samples) is kept for the contact sheet and the image-size statistics,
so only those images are decoded and the pass works on sets of any size. Writes to the output folder:
    inspect.json         counts, image size and caption length statistics, unreadable shards, sampled corrupt
                         images, and the index reports' excluded / no-caption counts when indexes exist
    contact_sheet.png    the sampled images, each thumbnailed into a fixed cell with its key and caption below
                         (a corrupt image shows as a labelled placeholder)
    caption_lengths.png  histogram of caption lengths in words
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import tarfile
from collections import Counter

from fastenc.data.index import index_path_for, iter_tar_samples, read_report, reason_kind, summarize
from fastenc.data.transforms import IMAGE_EXTENSIONS, CorruptSample, decode_caption, decode_image
from fastenc.datatools import DataToolError
from fastenc.utils import atomic

CELL = 128  # thumbnail side in the contact sheet, pixels
_CAPTION_LINES = 3


def _counter_stats(counts: Counter, *, mean: bool = True) -> dict | None:
    """min / median / (mean) / max of the values counted in `counts` ({value: times}); None when empty."""
    n = sum(counts.values())
    if not n:
        return None
    values = sorted(counts)

    def nth(i):  # the i-th smallest value (0-based)
        seen = 0
        for v in values:
            seen += counts[v]
            if seen > i:
                return v

    median = (nth((n - 1) // 2) + nth(n // 2)) / 2
    out = {"min": values[0], "median": int(median) if median == int(median) else median, "max": values[-1]}
    if mean:
        out["mean"] = round(sum(v * c for v, c in counts.items()) / n, 2)
    return out


class _Scan:
    """Running counts over the samples of one pass."""

    def __init__(self, num_samples: int, seed: int):
        self.k, self.rng = num_samples, random.Random(seed)
        self.reservoir: list[dict | None] = [None] * num_samples
        self.num_samples = self.with_image = self.with_caption = self.with_json = self.caption_invalid = 0
        self.caption_invalid_reasons, self.extensions = Counter(), Counter()
        self.words, self.chars = Counter(), Counter()

    def slot(self) -> int | None:
        """Reservoir sampling (algorithm R): the slot the sample now starting takes, or None if not kept."""
        i = self.num_samples
        self.num_samples += 1
        if i < self.k:
            return i
        j = self.rng.randrange(i + 1)
        return j if j < self.k else None

    def finish(self, sample: dict, slot: int | None) -> None:
        exts = sample["exts"]
        self.extensions.update(exts)
        self.with_image += any(e in exts for e in IMAGE_EXTENSIONS)
        self.with_json += "json" in exts
        if "txt" in sample:
            try:
                caption = decode_caption(sample["txt"])
            except CorruptSample as e:
                self.caption_invalid += 1
                self.caption_invalid_reasons[reason_kind(str(e))] += 1
                sample["caption_problem"] = str(e)
            else:
                self.with_caption += 1
                self.words[len(caption.split())] += 1
                self.chars[len(caption)] += 1
                sample["caption"] = caption
        if slot is not None:
            sample.pop("txt", None)
            self.reservoir[slot] = sample


def _scan_shard(path: str, scan: _Scan) -> None:
    """Feed one shard's samples to `scan`; reads the bytes of captions always, of images and json only if sampled."""
    slots = {}

    def read(key, ext):  # called member by member: draw the sample's reservoir slot at its first member
        if key not in slots:
            slots.clear()
            slots[key] = scan.slot()
        return ext == "txt" or (slots[key] is not None and (ext == "json" or ext in IMAGE_EXTENSIONS))

    for key, members in iter_tar_samples(path, mode="r|*", read=read):  # streaming: also .tar.gz, no seeks
        sample = {"key": key, "shard": path, "exts": list(members)}
        sample.update({ext: data for ext, (_, data) in members.items() if data is not None})
        scan.finish(sample, slots.get(key))


def _label(sample: dict):
    """The sample json's class label (ingest's label, else label_id), for the contact sheet; None without one."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    return meta.get("label", meta.get("label_id"))


@functools.lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled font: no system font needed


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines of `width` pixels; the last one ends with '...' if cut."""
    words, lines, line = text.split(), [], ""
    while words and len(lines) < max_lines:
        trial = f"{line} {words[0]}".strip()
        if draw.textlength(trial, font=font) <= width:
            line = trial
            words.pop(0)
            continue
        if not line:  # one word wider than the cell: break it
            cut = max(1, max(i for i in range(1, len(words[0]) + 1)
                             if i == 1 or draw.textlength(words[0][:i], font=font) <= width))
            line, words[0] = words[0][:cut], words[0][cut:]
        lines.append(line)
        line = ""
    if line and len(lines) < max_lines:
        lines.append(line)
    if words and lines:
        last = lines[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return lines


def contact_sheet(samples: list[dict], out_png: str, *, cell: int = CELL, columns: int = 8) -> dict:
    """Draw the samples into a grid PNG; returns {"image_sizes": [(w, h)], "corrupt": [{key, shard, reason}]}."""
    from PIL import Image, ImageDraw, ImageOps

    font_size = max(9, cell // 11)
    font, line_h, pad = _font(font_size), font_size + 3, 4
    text_h = line_h * (1 + _CAPTION_LINES)
    cols = max(1, min(columns, len(samples)))
    rows = max(1, math.ceil(len(samples) / cols))
    cw, ch = cell + 2 * pad, cell + text_h + 2 * pad
    sheet = Image.new("RGB", (cols * cw, rows * ch), "white")
    draw = ImageDraw.Draw(sheet)
    sizes, corrupt = [], []
    for i, s in enumerate(samples):
        x, y = (i % cols) * cw + pad, (i // cols) * ch + pad
        ext = next((e for e in IMAGE_EXTENSIONS if e in s), None)
        problem = None
        if ext is None:
            problem = "no image"
        else:
            try:
                img = decode_image(s[ext])
            except CorruptSample as e:
                problem = str(e)
                corrupt.append({"key": s["key"], "shard": s["shard"], "reason": problem})
            else:
                sizes.append(img.size)
                img = ImageOps.contain(img, (cell, cell), Image.Resampling.BICUBIC)  # up or down to the cell
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(235, 235, 235))
                sheet.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
        if problem is not None:  # a labelled placeholder: the sheet shows what is wrong instead of failing
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(255, 228, 228), outline=(200, 0, 0))
            draw.line([x, y, x + cell - 1, y + cell - 1], fill=(235, 160, 160))
            draw.line([x, y + cell - 1, x + cell - 1, y], fill=(235, 160, 160))
            label = ["CORRUPT" if ext else "NO IMAGE", *_wrap(draw, reason_kind(problem), font, cell - 8, 3)]
            for j, text in enumerate(label):
                draw.text((x + 4, y + 4 + j * line_h), text, font=font, fill=(160, 0, 0))
        ty = y + cell + 2
        title = os.path.basename(s["key"])
        label = _label(s)
        if label is not None:
            title = _wrap(draw, f"{title} [{label}]", font, cell, 1)[0]
        draw.text((x, ty), title, font=font, fill=(90, 90, 90))
        if "caption" in s:
            lines, color = _wrap(draw, s["caption"], font, cell, _CAPTION_LINES), (0, 0, 0)
        else:
            lines, color = [s.get("caption_problem", "(no caption)")[:40]], (160, 0, 0)
            lines = _wrap(draw, lines[0], font, cell, _CAPTION_LINES)
        for j, text in enumerate(lines):
            draw.text((x, ty + (j + 1) * line_h), text, font=font, fill=color)
    with atomic.atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    return {"image_sizes": sizes, "corrupt": corrupt}


def caption_histogram(words: Counter, out_png: str) -> str:
    """Histogram of caption lengths in words (matplotlib, Agg backend), written atomically."""
    from fastenc.utils.optional import require

    mpl = require("matplotlib", "fastenc data inspect")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    n = sum(words.values())
    if n:
        hi = max(words)
        bins = range(0, hi + 2) if hi <= 80 else 60
        ax.hist(list(words), bins=bins, weights=list(words.values()), color="#4477aa", align="left")
        ax.set_title(f"caption length: {n:,} captions, median {_counter_stats(words)['median']:g} words")
    else:
        ax.text(0.5, 0.5, "no captions", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("caption length")
    ax.set_xlabel("words")
    ax.set_ylabel("samples")
    ax.grid(alpha=0.3)
    return atomic.save_figure(fig, out_png)


def _shard_paths(shards) -> list[str]:
    """The local shard files of a shard spec; DataToolError when there are none or they are remote."""
    from fastenc.data.shards import expand_shards

    try:
        paths = expand_shards(shards, check=False)
    except FileNotFoundError as e:
        raise DataToolError(str(e)) from e
    remote = [p for p in paths if "://" in p or p.startswith("pipe:")]
    if remote:
        raise DataToolError(f"inspect reads local shards only; got {remote[0]!r}")
    return paths


def _scan_shards(paths: list[str], scan: _Scan, progress: bool) -> tuple[list[dict], int]:
    """One pass over every shard into `scan`: (unreadable shards with the reason, total bytes)."""
    from tqdm.auto import tqdm

    unreadable, total_bytes = [], 0
    bar = tqdm(paths, desc="inspect", unit="shard", disable=not progress)
    for p in bar:
        total_bytes += os.path.getsize(p)
        before = scan.num_samples
        try:
            _scan_shard(p, scan)
        except (tarfile.TarError, EOFError, OSError) as e:
            unreadable.append({"shard": p, "reason": f"not a readable tar after {scan.num_samples - before} "
                                                     f"samples ({type(e).__name__}: {e})"})
        bar.set_postfix(samples=scan.num_samples)
    bar.close()
    return unreadable, total_bytes


def _index_summary(paths: list[str], index_dir: str | None) -> dict:
    """What `fastenc data index` / ingest recorded in the current index reports: samples the loaders will leave
    out, and why."""
    reports, stale = [], 0
    for p in paths:
        try:
            rep = read_report(p, index_path_for(p, index_dir))
        except OSError:
            rep = None
        if rep is None:
            stale += 1
        else:
            reports.append(rep)
    index = {"shards_with_index": len(reports), "shards_without_current_index": stale}
    if reports:
        summ = summarize(reports)
        index.update({k: summ[k] for k in ("num_samples", "num_captioned", "num_excluded", "excluded_reasons",
                                           "num_no_caption", "no_caption_reasons", "num_empty_shards")})
        index["unreadable_shards"] = [{"shard": r.shard, "reason": r.error} for r in reports if r.error]
    return index


def inspect_shards(shards, out_dir, *, num_samples: int = 32, seed: int = 0, index_dir: str | None = None,
                   progress: bool = True) -> dict:
    """Scan `shards` (a spec for expand_shards) and write inspect.json, contact_sheet.png and caption_lengths.png
    into `out_dir`; returns what inspect.json holds. A shard that cannot be read is reported, not fatal."""
    if num_samples < 1:
        raise DataToolError(f"--num-samples must be >= 1, got {num_samples}")
    paths = _shard_paths(shards)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    scan = _Scan(num_samples, seed)
    unreadable, total_bytes = _scan_shards(paths, scan, progress)
    sampled = [s for s in scan.reservoir if s is not None]
    files = {"contact_sheet": os.path.join(out_dir, "contact_sheet.png"),
             "caption_lengths": os.path.join(out_dir, "caption_lengths.png"),
             "inspect": os.path.join(out_dir, "inspect.json")}
    sheet = contact_sheet(sampled, files["contact_sheet"])
    caption_histogram(scan.words, files["caption_lengths"])
    index = _index_summary(paths, index_dir)

    widths = Counter(w for w, _ in sheet["image_sizes"])
    heights = Counter(h for _, h in sheet["image_sizes"])
    result = {
        "shards": paths if len(paths) <= 100 else paths[:100] + [f"... {len(paths) - 100} more"],
        "num_shards": len(paths),
        "num_unreadable_shards": len(unreadable),
        "unreadable_shards": unreadable,
        "total_bytes": total_bytes,
        "num_samples": scan.num_samples,
        "with_image": scan.with_image,
        "with_caption": scan.with_caption,
        "caption_invalid": scan.caption_invalid,
        "caption_invalid_reasons": dict(scan.caption_invalid_reasons),
        "with_json": scan.with_json,
        "extensions": dict(scan.extensions.most_common()),
        "num_sampled": len(sampled),
        "seed": seed,
        "image_size": {"num_decoded": len(sheet["image_sizes"]),
                       "width": _counter_stats(widths, mean=False), "height": _counter_stats(heights, mean=False)},
        "sampled_corrupt": sheet["corrupt"],
        "sampled_without_image": sum(not any(e in s for e in IMAGE_EXTENSIONS) for s in sampled),
        "caption_words": _counter_stats(scan.words),
        "caption_chars": _counter_stats(scan.chars),
        "index": index,
        "files": files,
    }
    atomic.write_json(files["inspect"], result, ensure_ascii=False)
    return result


def _reasons(counts: dict) -> str:
    return " (" + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")" if counts else ""


def format_summary(r: dict) -> str:
    """What `fastenc data inspect` prints."""
    def stats(s, unit=""):
        return "n/a" if not s else f"{s['min']:g}/{s['median']:g}/{s['max']:g}{unit}"

    size, ix = r["image_size"], r["index"]
    lines = [f"{r['num_samples']:,} samples in {r['num_shards']} shard(s), {r['total_bytes'] / 1e6:.1f} MB: "
             f"{r['with_image']:,} with an image, {r['with_caption']:,} with a caption"
             + (f" ({r['caption_invalid']:,} more with an unusable .txt)" if r["caption_invalid"] else "")
             + f", {r['with_json']:,} with json.",
             f"sampled {r['num_sampled']} (seed {r['seed']}): width min/median/max {stats(size['width'], ' px')}, "
             f"height {stats(size['height'], ' px')}"
             + (f"; {len(r['sampled_corrupt'])} corrupt" if r["sampled_corrupt"] else "") + ".",
             f"caption words min/median/max {stats(r['caption_words'])}"
             + (f" (mean {r['caption_words']['mean']:g})" if r["caption_words"] else "")
             + f", characters {stats(r['caption_chars'])}."]
    if not ix["shards_with_index"]:
        lines.append("no current DALI index reports next to the shards (build them with `fastenc data index`).")
    else:
        lines.append(f"index reports of {ix['shards_with_index']} shard(s)"
                     + (f" ({ix['shards_without_current_index']} without a current index)"
                        if ix["shards_without_current_index"] else "")
                     + f": {ix['num_excluded']:,} sample(s) excluded{_reasons(ix['excluded_reasons'])}, "
                     f"{ix['num_no_caption']:,} without caption{_reasons(ix['no_caption_reasons'])}.")
    for u in r["unreadable_shards"]:
        lines.append(f"unreadable: {u['shard']}: {u['reason']}")
    lines.append(f"wrote {r['files']['inspect']}, {r['files']['contact_sheet']}, {r['files']['caption_lengths']}")
    return "\n".join(lines)
