"""The disagreement criteria: absolute cosine cuts (PairThresholds, the paper's and the strict presets), per-encoder
quantile cuts (QuantileThresholds, resolved to absolute cuts from a sample of pair cosines), and as_thresholds, which
turns every accepted spelling (an instance, a preset name, a mapping of fields, "quantile") into one of the two.
Depends on nothing else in the package."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class PairThresholds:
    """The two disagreement criteria. A-high: cos_a > a_high and cos_b < b_low; B-high: cos_b > b_high and
    cos_a < a_low. Defaults: the paper's, with A = CLIP and B = DINO. Comparisons are strict and happen in the
    cosines' precision (float32 features: the thresholds rounded to float32)."""

    a_high: float = 0.7
    b_low: float = 0.5
    b_high: float = 0.8
    a_low: float = 0.5

    def __post_init__(self):
        _check_cuts(self, "threshold", -1.0, "a finite cosine in [-1, 1]")

    def describe(self, names: Sequence[str] = ("a", "b"), quantiles: "QuantileThresholds | None" = None) -> dict:
        """Human-readable criteria per side, keyed "<a>_high" / "<b>_high" (with the quantiles the cuts came from)."""
        a, b = names

        def cut(field):
            v = f"{getattr(self, field):.4g}" if quantiles else f"{getattr(self, field):g}"
            return v + (f" (q{getattr(quantiles, field):g})" if quantiles else "")

        return {f"{a}_high": f"cos_{a} > {cut('a_high')} and cos_{b} < {cut('b_low')}",
                f"{b}_high": f"cos_{b} > {cut('b_high')} and cos_{a} < {cut('a_low')}"}


def _check_cuts(cuts, what: str, lowest: float, allowed: str) -> None:
    """Both threshold dataclasses: every field a finite number in [lowest, 1] (stored as float), and each encoder's
    'high' cut not under its 'low' cut (the two sides could then overlap)."""
    for field in dataclasses.fields(cuts):
        v = getattr(cuts, field.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lowest <= v <= 1:
            raise ValueError(f"{what} {field.name}={v!r}: must be {allowed}")
        object.__setattr__(cuts, field.name, float(v))
    for hi, lo in (("a_high", "a_low"), ("b_high", "b_low")):
        if getattr(cuts, hi) < getattr(cuts, lo):
            raise ValueError(f"{what} {hi}={getattr(cuts, hi)} is below {lo}={getattr(cuts, lo)}: an encoder's "
                             f"'high' cut must not be under its 'low' cut (the two sides could then overlap)")


PAPER_THRESHOLDS = PairThresholds()
STRICT_THRESHOLDS = PairThresholds(a_high=0.9, b_low=0.5, b_high=0.95, a_low=0.2)
_PRESETS = {"paper": PAPER_THRESHOLDS, "strict": STRICT_THRESHOLDS}


@dataclasses.dataclass(frozen=True)
class QuantileThresholds:
    """The same criteria with each cut given as a quantile of that encoder's own cosine distribution over the
    pairs (e.g. a_high=0.95: the top 5 % of pairs under A), for encoders whose cosine scales differ: a small ViT's
    CLS features can sit at cosine 0.6-1.0 for every pair, where the paper's absolute cuts select nothing.
    `resolve` turns them into absolute PairThresholds from a sample of pair cosines (scan.resolve_quantiles: at
    most scan.QUANTILE_PAIRS of the scanned pairs, an even stride through them, or a seeded sample of that size
    when every pair is scanned and there are more)."""

    a_high: float = 0.95
    b_low: float = 0.5
    b_high: float = 0.95
    a_low: float = 0.5

    def __post_init__(self):
        _check_cuts(self, "quantile", 0.0, "in [0, 1]")

    def resolve(self, cos_a: torch.Tensor, cos_b: torch.Tensor) -> PairThresholds:
        """Absolute cuts: the quantiles of cos_a (a_high, a_low) and cos_b (b_high, b_low), float64."""
        if cos_a.numel() == 0:
            raise ValueError("quantile thresholds need at least one pair to estimate the cosine quantiles from")
        # float32 cosines of near-identical images can round past 1: the cuts stay valid cosines
        qa = torch.quantile(cos_a.double(), torch.tensor([self.a_high, self.a_low], dtype=torch.float64)).clamp(-1, 1)
        qb = torch.quantile(cos_b.double(), torch.tensor([self.b_high, self.b_low], dtype=torch.float64)).clamp(-1, 1)
        return PairThresholds(a_high=float(qa[0]), a_low=float(qa[1]), b_high=float(qb[0]), b_low=float(qb[1]))


def as_thresholds(thresholds) -> PairThresholds | QuantileThresholds:
    """A PairThresholds from itself, a preset name ("paper", "strict"), or a mapping of the fields to change; a
    QuantileThresholds from itself, "quantile" (its defaults) or {"quantile": {fields to change}}."""
    if isinstance(thresholds, QuantileThresholds) or thresholds == "quantile":
        return QuantileThresholds() if thresholds == "quantile" else thresholds
    if isinstance(thresholds, Mapping) and set(thresholds) == {"quantile"}:
        q = thresholds["quantile"] or {}
        if not isinstance(q, Mapping):
            raise ValueError(f"thresholds {{quantile: ...}} takes a mapping of quantiles, got {q!r}")
        known = {f.name for f in dataclasses.fields(QuantileThresholds)}
        if set(q) - known:
            raise ValueError(f"unknown quantile field(s) {sorted(set(q) - known)} (known: {sorted(known)})")
        return QuantileThresholds(**q)
    return _as_absolute(thresholds)


def _as_absolute(thresholds: PairThresholds | Mapping[str, float] | str | None) -> PairThresholds:
    """A PairThresholds from itself, a preset name ("paper", "strict"), or a mapping of the fields to change."""
    if thresholds is None:
        return PAPER_THRESHOLDS
    if isinstance(thresholds, PairThresholds):
        return thresholds
    if isinstance(thresholds, str):
        if thresholds not in _PRESETS:
            raise ValueError(f"unknown threshold preset {thresholds!r} (known: {', '.join(_PRESETS)}, quantile)")
        return _PRESETS[thresholds]
    if isinstance(thresholds, Mapping):
        known = {f.name for f in dataclasses.fields(PairThresholds)}
        unknown = sorted(set(thresholds) - known)
        if unknown:
            raise ValueError(f"unknown threshold field(s) {unknown} (known: {sorted(known)}, or {{quantile: ...}})")
        return PairThresholds(**thresholds)
    raise ValueError(f"thresholds must be a PairThresholds, a preset name or a mapping, "
                     f"not {type(thresholds).__name__}")
