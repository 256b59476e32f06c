"""What every evaluation's results files share: named sources, strict JSON, portable paths."""

from __future__ import annotations

import math
import os
import re


def parse_source(source: str) -> tuple[str | None, str]:
    """"NAME=SOURCE" -> (NAME, SOURCE); a plain source -> (None, source). NAME: letters, digits, _ . @ -."""
    m = re.fullmatch(r"([A-Za-z0-9_.@-]+)=(.+)", source)
    return (m.group(1), m.group(2)) if m else (None, source)


def finite(x):
    """NaN / inf -> None, recursively (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def display_path(path: str) -> str:
    """Relative to the working directory when below it (reports stay portable), else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
