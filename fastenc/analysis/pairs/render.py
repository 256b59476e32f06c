"""Pictures of pairs: render_pairs draws kept pairs as a sheet of two-image panels with captions (rank, cosines,
image indices, shared attributes) and writes it as a PNG through fastenc.utils.atomic; pair_grid_size states the
sheet's size. Depends on sharing (the attribute table)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Mapping, Sequence

import torch

from fastenc.analysis.pairs.sharing import check_attributes, shared_attributes
from fastenc.utils import atomic

_PAD, _GAP, _CAPTION_LINES = 8, 4, 3


def _font_size(cell: int) -> int:
    return max(10, cell // 10)


@dataclasses.dataclass(frozen=True)
class _Grid:
    """The sheet's geometry in px: panels of two cells above a caption, `cols` of them a row, `top` for the title."""

    line_h: int
    panel_w: int
    panel_h: int
    cols: int
    top: int
    width: int
    height: int

    def origin(self, r: int) -> tuple[int, int]:
        """Top-left corner of panel r (row-major)."""
        x = _PAD + (r % self.cols) * (self.panel_w + _PAD)
        return x, self.top + _PAD + (r // self.cols) * (self.panel_h + _PAD)


def _grid(num_pairs: int, cell: int, columns: int, title: bool) -> _Grid:
    line_h = _font_size(cell) + 3
    panel_w, panel_h = 2 * cell + _GAP, cell + _CAPTION_LINES * line_h + 4
    cols = max(1, min(columns, num_pairs))
    rows = max(1, math.ceil(num_pairs / cols))
    top = (line_h + _PAD) if title else 0
    width, height = _PAD + cols * (panel_w + _PAD), top + _PAD + rows * (panel_h + _PAD)
    return _Grid(line_h, panel_w, panel_h, cols, top, width, height)


def pair_grid_size(num_pairs: int, *, cell: int = 128, columns: int = 2, title: bool = True) -> tuple[int, int]:
    """(width, height) in px of render_pairs' PNG. Each pair is a panel of two cell x cell images 4 px apart above
    a caption of 3 lines (line height = max(10, cell // 10) + 3, plus 4 px); panels sit in min(columns, pairs)
    columns with 8 px around and between them; a title adds one line height + 8 px at the top. No pairs: one
    panel's space (holding a "no pairs" note)."""
    grid = _grid(num_pairs, cell, columns, title)
    return grid.width, grid.height


@functools.lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled font (>= 10.1): no system font needed
    except (TypeError, OSError):  # older Pillow, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _check_render_args(pairs, cell, columns, cos_a, cos_b, attributes) -> tuple[torch.Tensor, dict]:
    """render_pairs' arguments checked: the pairs as [k, 2] int64 and the attribute table ({} without one)."""
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 8:
        raise ValueError(f"cell must be an integer >= 8 px, got {cell!r}")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive integer, got {columns!r}")
    pairs = torch.as_tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    k = pairs.shape[0]
    for name, cos in (("cos_a", cos_a), ("cos_b", cos_b)):
        if cos is not None and len(cos) != k:
            raise ValueError(f"{name} has {len(cos)} values for {k} pairs")
    attrs = {}
    if attributes:
        attrs = check_attributes(attributes, len(next(iter(attributes.values()))))
        n = next(iter(attrs.values())).shape[0]
        if k and int(pairs.max()) >= n:
            raise ValueError(f"pair index {int(pairs.max())} is outside the attribute table's {n} images")
    return pairs, attrs


def _thumbnails(load_image: Callable[[int], object], cell: int) -> Callable[[int], object]:
    """index -> load_image(index) fitted into a cell x cell square, each image loaded once."""
    from PIL import Image, ImageOps

    thumbs: dict[int, object] = {}

    def thumb(index: int):
        if index not in thumbs:
            img = load_image(index)
            if not isinstance(img, Image.Image):
                raise ValueError(f"load_image({index}) returned {type(img).__name__}, not a PIL.Image")
            thumbs[index] = ImageOps.contain(img.convert("RGB"), (cell, cell), Image.Resampling.BICUBIC)
        return thumbs[index]

    return thumb


def _caption(r: int, i: int, j: int, cos_a, cos_b, names: Sequence[str], attrs: dict) -> list[str]:
    """Panel r's caption lines: rank and cosines, the image indices, and (with attributes) what the two share."""
    head = f"#{r + 1}"
    if cos_a is not None and cos_b is not None:  # compact, so that small cells keep both numbers
        head += f"  {float(cos_a[r]):.3f} / {float(cos_b[r]):.3f}"
    elif cos_a is not None or cos_b is not None:
        name, cos = (names[0], cos_a) if cos_a is not None else (names[1], cos_b)
        head += f"  {name}={float(cos[r]):.3f}"
    lines = [head, f"images {i} & {j}"]
    if attrs:
        shared = [a.replace("_id", "") for a in shared_attributes(attrs, i, j)]
        lines.append("same: " + (", ".join(shared) if shared else "-"))
    return lines


def render_pairs(pairs, load_image: Callable[[int], object], out_png: str, *, cos_a=None, cos_b=None,
                 names: Sequence[str] = ("a", "b"), attributes: Mapping[str, object] | None = None,
                 title: str | None = None, cell: int = 128, columns: int = 2) -> str:
    """Draw each pair (i, j) of `pairs` ([k, 2], best first) as two images side by side, captioned with its rank,
    the two cosines (when given: "cos_a / cos_b"), the image indices and the attributes the two images share
    (present and equal; "_id" dropped from their names).
    load_image(index) -> PIL.Image; each image is fitted into a cell x cell square. Size: pair_grid_size.
    Written atomically (fastenc.utils.atomic); returns out_png."""
    from PIL import Image, ImageDraw

    pairs, attrs = _check_render_args(pairs, cell, columns, cos_a, cos_b, attributes)
    k = pairs.shape[0]
    grid = _grid(k, cell, columns, bool(title))
    font = _font(_font_size(cell))
    sheet = Image.new("RGB", (grid.width, grid.height), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((_PAD, _PAD), _fit(draw, title, font, grid.width - 2 * _PAD), font=font, fill=(0, 0, 0))
    if k == 0:
        draw.text((_PAD, grid.top + _PAD), _fit(draw, "no pairs passed", font, grid.panel_w), font=font,
                  fill=(160, 0, 0))
    thumb = _thumbnails(load_image, cell)
    for r in range(k):
        i, j = int(pairs[r, 0]), int(pairs[r, 1])
        x, y = grid.origin(r)
        for slot, index in enumerate((i, j)):
            cx = x + slot * (cell + _GAP)
            img = thumb(index)
            draw.rectangle([cx, y, cx + cell - 1, y + cell - 1], fill=(235, 235, 235))
            sheet.paste(img, (cx + (cell - img.width) // 2, y + (cell - img.height) // 2))
        for li, text in enumerate(_caption(r, i, j, cos_a, cos_b, names, attrs)):
            draw.text((x, y + cell + 2 + li * grid.line_h), _fit(draw, text, font, grid.panel_w), font=font,
                      fill=(0, 0, 0) if li == 0 else (70, 70, 70))
    with atomic.atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    return out_png
