"""Synthetic study data: shapes of known category, color and background, some with a written word.

The shards look like img2dataset's ({key}.jpg, {key}.txt, {key}.json, 9-digit keys), so every reader of real data
reads them unchanged, and every attribute is known exactly, so probes can ask what an encoder learned (shape vs
color vs text). Sample i is drawn from its own numpy Generator seeded by (seed, i): the same seed gives
byte-identical tars whatever the shard size.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import tarfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fastenc.data.index import build_index, index_path_for, report_path_for
from fastenc.utils import atomic

log = logging.getLogger(__name__)

CATEGORIES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "heart", "crescent", "arrow")
COLORS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 50),
    "cyan": (30, 200, 210), "blue": (30, 70, 220), "purple": (130, 40, 180), "pink": (245, 120, 190),
    "brown": (130, 80, 35), "white": (250, 250, 250), "black": (15, 15, 15),
}
COLOR_NAMES = tuple(COLORS)
STYLES = ("plain", "stripes", "checker", "dots", "gradient", "noise")
STYLE_ADJECTIVES = {"plain": "plain", "stripes": "striped", "checker": "checkered", "dots": "dotted",
                     "gradient": "gradient", "noise": "noisy"}
# Short, distinct from every category and color name, so captions stay unambiguous.
WORDS = ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "book", "cake", "door",
         "frog", "kite", "lamp", "milk", "note", "rain", "rose", "wolf", "zero", "jazz")

CAPTIONS = (
    "a photo of {obj}",
    "an image showing {obj}",
    "a picture of {obj}",
    "{obj} on a {style} background",
    "a drawing of {obj}",
    "there is {obj} in this image",
    "{obj}",
)
CAPTIONS_WITH_WORD = (
    '{obj} with the word "{word}" written on it',
    'a photo of {obj} labeled "{word}"',
    'the word "{word}" on {obj}',
    'an image of {obj} with the text "{word}"',
    '{obj} that says "{word}"',
    'a picture of {obj} with "{word}" written on it',
)

# The world's geometry, as knobs. benchmarks/shape_ceiling.py calibrated them (benchmarks/README.md): a shape that
# fills most of the frame, sits near the middle and stands nearly upright on a calm background is what the CPU
# recipe's ViT can learn to name within its budget; objects anywhere at any rotation (version 1) it could not.
KNOBS = {
    "radius": (0.3, 0.4),              # object radius, fraction of the side
    "center_jitter": 0.3,              # 0: centered; 1: anywhere the whole object fits
    "max_rotation": 15.0,              # degrees either way
    "pattern_contrast": (35, 60),      # mean |a - b| of a patterned background's two tones
    "word_scale": (0.15, 0.2),         # font size, fraction of the side
    "word_probability": 0.5,
    "max_marks": 3,                    # corner diamonds, 0..max_marks (the counting question's answer)
}

VERSION = 2
"""The world's version, in every manifest: 1 drew small objects anywhere at any rotation (a ViT could not learn the
shape category in the CPU budget); 2 draws them larger, near the middle, nearly upright, on calmer backgrounds, with
0-3 diamonds in the corners to count."""

_SUPERSAMPLE = 2  # draw at 2x and box-filter down: Pillow's polygon fill has no anti-aliasing


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


def _heart() -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return list(zip(x / 17, (y + 2) / 17))


# Outlines in a unit frame (radius about 1); circle, ring and crescent are drawn from ellipses instead.
_POLYGONS = {
    "square": [(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)],
    "triangle": _regular(3),
    "star": _star(),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "hexagon": _regular(6),
    "heart": _heart(),
    "arrow": [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)],
}


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: no system font needed


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _background(rng: np.random.Generator, style: str, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: muted, low-saturation tones so the object's named color stands out."""
    a = np.clip(rng.uniform(70, 185) + rng.uniform(-20, 20, 3), 0, 255).astype(np.float32)
    b = np.clip(rng.uniform(70, 185) + rng.uniform(-20, 20, 3), 0, 255).astype(np.float32)
    lo, hi = KNOBS["pattern_contrast"]
    if style != "plain" and np.abs(a - b).mean() < lo:  # keep the pattern visible
        b = np.clip(a + np.sign(128 - a.mean()) * 50, 0, 255).astype(np.float32)
    if style != "plain" and np.abs(a - b).mean() > hi:
        b = a + (b - a) * (hi / np.abs(a - b).mean())
    if style in ("plain", "noise"):
        img = np.broadcast_to(a, (size, size, 3))
        if style == "noise":
            img = img + 20 * rng.standard_normal((size, size, 3), dtype=np.float32)
        return np.clip(img, 0, 255).astype(np.uint8)
    y, x = _grid(size)
    if style == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.12, 0.3) * size
        weight = (x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))) % period < period / 2
    elif style == "checker":
        cell = rng.uniform(0.1, 0.25) * size
        weight = (x // cell + y // cell) % 2 == 1
    elif style == "dots":
        step = rng.uniform(0.14, 0.28) * size
        radius = rng.uniform(0.22, 0.35) * step
        weight = ((x % step) - step / 2) ** 2 + ((y % step) - step / 2) ** 2 < radius**2
    elif style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        proj = (x - size / 2) * np.float32(np.cos(angle)) + (y - size / 2) * np.float32(np.sin(angle))
        weight = np.clip(proj / size + 0.5, 0, 1)
    else:
        raise ValueError(f"unknown style {style!r}; known: {STYLES}")
    if weight.dtype == bool:  # two-tone patterns: a lookup instead of float arithmetic per pixel
        return np.stack([a, b]).astype(np.uint8)[weight.astype(np.uint8)]
    return (a + weight[..., None] * (b - a)).astype(np.uint8)


def _object_mask(category: str, size: int, cx: float, cy: float, radius: float, angle: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)

    def disk(x, y, r, fill):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    if category == "circle":
        disk(cx, cy, 0.9 * radius, 255)
    elif category == "ring":
        disk(cx, cy, radius, 255)
        disk(cx, cy, 0.55 * radius, 0)
    elif category == "crescent":
        disk(cx, cy, radius, 255)
        disk(cx + 0.45 * radius * math.cos(angle), cy + 0.45 * radius * math.sin(angle), 0.85 * radius, 0)
    else:
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + radius * (px * c - py * s), cy + radius * (px * s + py * c))
                      for px, py in _POLYGONS[category]], fill=255)
    return mask


def render_sample(index: int, *, image_size: int = 64, seed: int = 0) -> tuple[Image.Image, dict]:
    """Draw sample `index` of the synthetic set: (RGB image, attribute dict with the caption). Deterministic."""
    rng = np.random.default_rng([seed, index])
    category_id = int(rng.integers(len(CATEGORIES)))
    color_id = int(rng.integers(len(COLOR_NAMES)))
    style_id = int(rng.integers(len(STYLES)))
    word_id = int(rng.integers(len(WORDS))) if rng.random() < KNOBS["word_probability"] else -1
    category, color, style = CATEGORIES[category_id], COLOR_NAMES[color_id], STYLES[style_id]
    word = WORDS[word_id] if word_id >= 0 else None

    big = image_size * _SUPERSAMPLE
    radius = rng.uniform(*KNOBS["radius"]) * big
    # The whole object stays in the frame; center_jitter scales how far from the middle it may sit.
    cx, cy = big / 2 + KNOBS["center_jitter"] * rng.uniform(-1, 1, 2) * (big / 2 - radius)
    angle = math.radians(rng.uniform(-KNOBS["max_rotation"], KNOBS["max_rotation"]))
    rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, 3), 0, 255))

    # The background is drawn at the final size (it has no edges that need anti-aliasing): 4x fewer pixels.
    img = Image.fromarray(_background(rng, style, image_size)).resize((big, big), Image.Resampling.NEAREST)
    img.paste(rgb, (0, 0, big, big), _object_mask(category, big, cx, cy, radius, angle))
    if word is not None:
        font = _font(int(rng.uniform(*KNOBS["word_scale"]) * big))
        draw = ImageDraw.Draw(img)
        stroke = max(1, big // 64)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font, stroke_width=stroke)
        w, h = right - left, bottom - top
        # Centered on the object ("written on it"), jittered, kept inside the frame.
        x = np.clip(cx - w / 2 + rng.uniform(-0.15, 0.15) * radius, 0, max(0, big - w)) - left
        y = np.clip(cy - h / 2 + rng.uniform(-0.15, 0.15) * radius, 0, max(0, big - h)) - top
        dark = sum(c * k for c, k in zip(rgb, (0.299, 0.587, 0.114))) > 140
        ink, edge = ((0, 0, 0), (255, 255, 255)) if dark else ((255, 255, 255), (0, 0, 0))
        draw.text((float(x), float(y)), word, font=font, fill=ink, stroke_width=stroke, stroke_fill=edge)
    num_marks = _draw_marks(img, rng, big)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)

    obj = _article(f"{color} {category}" if rng.random() < 0.5 else category)
    if word is None:
        caption = CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(obj=obj, style=STYLE_ADJECTIVES[style])
    else:
        caption = CAPTIONS_WITH_WORD[int(rng.integers(len(CAPTIONS_WITH_WORD)))].format(obj=obj, word=word)
    attrs = {
        "category": category, "color": color, "style": style, "word": word, "caption": caption,
        "category_id": category_id, "color_id": color_id, "style_id": style_id, "word_id": word_id,
        # Geometry in fractions of the image side, for probes that ask about position or size.
        "center_x": round(float(cx) / big, 4), "center_y": round(float(cy) / big, 4),
        "radius": round(float(radius) / big, 4), "rotation": round(math.degrees(angle), 2),
        "num_marks": num_marks,
    }
    return img, attrs


_CORNERS = ((0.1, 0.1), (0.9, 0.1), (0.1, 0.9), (0.9, 0.9))


def _draw_marks(img: Image.Image, rng: np.random.Generator, big: int) -> int:
    """0 to KNOBS["max_marks"] small diamonds, each in its own corner of the frame (clear of the object; no
    background pattern has diamonds), black or white against the background there: what a counting question
    counts. Returns how many."""
    n = int(rng.integers(KNOBS["max_marks"] + 1))
    corners = rng.permutation(len(_CORNERS))[:n]
    draw = ImageDraw.Draw(img)
    r = 0.06 * big
    for k in corners:
        x, y = ((np.array(_CORNERS[k]) + rng.uniform(-0.02, 0.02, 2)) * big).tolist()
        light = np.asarray(img.getpixel((int(x), int(y))), dtype=np.float32) @ np.array([0.299, 0.587, 0.114]) > 128
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=(15, 15, 15) if light else (245, 245, 245))
    return n


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so that the same samples give byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def remove_temp_files(out_dir: str) -> None:
    """Delete the temporary files (fastenc.utils.atomic's, hidden) that a killed shard writer left in out_dir:
    those of shards, their indexes and reports, and manifest.json; other hidden files stay."""
    for f in os.listdir(out_dir):
        target = atomic.temp_target(f)
        if target is not None and (target == "manifest.json" or target.endswith((".tar", ".idx", ".idx.json"))):
            os.remove(os.path.join(out_dir, f))


def write_synthetic_shards(out_dir, num_samples: int, *, image_size: int = 64, seed: int = 0,
                           samples_per_shard: int = 1000, progress: bool = True) -> dict:
    """Write `num_samples` synthetic samples as webdataset shards out_dir/shard-00000.tar, ... plus manifest.json.

    Each shard gets its DALI index (shard-00000.idx and its .idx.json report, fastenc.data.index).

    Every file is written atomically (fastenc.utils.atomic), and manifest.json last, so an interrupted run never
    leaves a truncated shard under a final name. Returns the manifest.
    """
    if num_samples <= 0 or samples_per_shard <= 0 or image_size < 16:
        raise ValueError(f"need num_samples > 0, samples_per_shard > 0 and image_size >= 16; got {num_samples}, "
                         f"{samples_per_shard}, {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    num_shards = math.ceil(num_samples / samples_per_shard)
    shards = [f"shard-{s:05d}.tar" for s in range(num_shards)]
    _remove_stale_shards(out_dir, set(shards))
    remove_temp_files(out_dir)

    try:
        from tqdm.auto import tqdm
    except ImportError:
        progress = False
    bar = tqdm(total=num_samples, desc=f"synth -> {out_dir}", unit="img", disable=not progress)
    for s, name in enumerate(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * samples_per_shard, min(num_samples, (s + 1) * samples_per_shard)):
                key = f"{i:09d}"
                img, attrs = render_sample(i, image_size=image_size, seed=seed)
                jpg = io.BytesIO()
                img.save(jpg, format="JPEG", quality=90)
                _add_file(tar, f"{key}.jpg", jpg.getvalue())
                _add_file(tar, f"{key}.txt", attrs["caption"].encode("utf-8"))
                _add_file(tar, f"{key}.json", json.dumps({"key": key, **attrs}).encode("utf-8"))
                bar.update(1)
        atomic.write_bytes(os.path.join(out_dir, name), buf.getvalue())
        # The DALI index, next to the shard (the images were just encoded here: no need to decode them again).
        build_index(os.path.join(out_dir, name), assume_valid=True)
    bar.close()

    manifest = {  # "fastenc.data.synth": the manifest format's name, as earlier versions wrote it
        "generator": "fastenc.data.synth", **world_manifest(),
        "num_samples": num_samples, "num_shards": num_shards, "samples_per_shard": samples_per_shard,
        "shards": shards, "image_size": image_size, "seed": seed,
        "categories": list(CATEGORIES), "colors": list(COLOR_NAMES), "styles": list(STYLES), "words": list(WORDS),
    }
    atomic.write_json(os.path.join(out_dir, "manifest.json"), manifest, indent=2)
    log.info("wrote %d samples in %d shards to %s", num_samples, num_shards, out_dir)
    return manifest


GENERATORS = ("fastenc.data.synth", "fastenc.datatools.synth_vqa")
"""The `generator` of the manifests this world's sets carry (shards; the vision-language folder)."""


def world_manifest() -> dict:
    """What identifies this world in a manifest: its VERSION and KNOBS."""
    return {"version": VERSION, "knobs": {k: list(v) if isinstance(v, tuple) else v for k, v in KNOBS.items()}}


def is_stale(out_dir: str) -> bool:
    """Whether out_dir holds a synthetic set (its manifest says fastenc.data.synth) drawn by another world than this
    one (VERSION, KNOBS): whoever generates on first use should draw it again. Other data is never stale."""
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    world = world_manifest()
    return manifest.get("generator") in GENERATORS and any(manifest.get(k) != v for k, v in world.items())


def _remove_stale_shards(out_dir: str, keep: set[str]) -> None:
    """Delete shards of an earlier, larger synth run in the same folder (a directory spec would read them)."""
    path = os.path.join(out_dir, "manifest.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    if old.get("generator") != "fastenc.data.synth":
        return
    os.remove(path)  # no manifest until this run completes: its absence marks an unfinished run
    for name in old.get("shards", []):
        if name not in keep and os.path.basename(name) == name and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
            for idx in (index_path_for(os.path.join(out_dir, name)),):
                for path in (idx, report_path_for(idx)):
                    if os.path.exists(path):
                        os.remove(path)
            log.info("removed stale shard %s from an earlier synth run", name)
