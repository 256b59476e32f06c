"""Attribute sharing: the per-image attribute table (check_attributes), how many pairs of each pair set have two
images with the same present value (the counter scan_pairs feeds, and attribute_sharing for explicit pair sets), and
each attribute's chance of sharing (attribute_summary). Depends on cosines (the pair check)."""

from __future__ import annotations

from typing import Mapping

import torch

from fastenc.analysis.pairs.cosines import check_pairs


def check_attributes(attributes: Mapping[str, object] | None, n: int) -> dict[str, torch.Tensor]:
    """{name: int64 [N]} from a mapping of per-image integer values (tensors, arrays, lists); -1 means absent."""
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise ValueError(f"attributes must be a mapping name -> [N] integer values, not {type(attributes).__name__}")
    out = {}
    for name, values in attributes.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"attribute names must be non-empty strings, got {name!r}")
        v = torch.as_tensor(values)
        if v.dim() != 1 or v.shape[0] != n:
            raise ValueError(f"attribute {name!r} has shape {tuple(v.shape)}: need one value per image, [{n}]")
        if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"attribute {name!r} must hold integer ids (-1 = absent), got {v.dtype}")
        v = v.to(torch.int64).cpu()
        if v.numel() and int(v.min()) < -1:
            raise ValueError(f"attribute {name!r} has value {int(v.min())}: ids are >= 0, and -1 means absent")
        out[name] = v
    return out


def _has_absent(v: torch.Tensor) -> bool:
    return bool((v < 0).any())


class SharingCounter:
    """Per pair set and attribute: pairs, pairs sharing a present value, pairs with both values present."""

    def __init__(self, attributes: dict[str, torch.Tensor]):
        self.attributes = attributes
        self.counts: dict[str, dict[str, list[int]]] = {}

    def add(self, set_name: str, i: torch.Tensor, j: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        per = self.counts.setdefault(set_name, {a: [0, 0, 0] for a in self.attributes})
        if mask is not None:
            i, j = i[mask], j[mask]
        for name, v in self.attributes.items():
            vi, vj = v[i], v[j]
            present = (vi >= 0) & (vj >= 0)
            c = per[name]
            c[0] += int(i.numel())
            c[1] += int(((vi == vj) & present).sum())
            c[2] += int(present.sum())

    def table(self) -> dict:
        out = {}
        for set_name, per in self.counts.items():
            out[set_name] = {}
            for name, (n, shared, both) in per.items():
                row = {"pairs": n, "shared": shared, "share": shared / n if n else None}
                if _has_absent(self.attributes[name]):
                    row.update(both_present=both / n if n else None, share_if_present=shared / both if both else None)
                out[set_name][name] = row
        return out


def attribute_sharing(attributes: Mapping[str, object], pair_sets: Mapping[str, object], *,
                      num_images: int | None = None) -> dict:
    """{set: {attribute: row}} for explicit [k, 2] pair sets; row = {"pairs", "shared" (pairs whose two images
    have the same present value), "share" (= shared / pairs)} and, for attributes with absent (-1) values,
    "both_present" (fraction of pairs where both images have a value) and "share_if_present" (shared / both
    present). Fractions are None for an empty set."""
    if num_images is None:
        num_images = len(next(iter(attributes.values()))) if attributes else 0
    attrs = check_attributes(attributes, num_images)
    counter = SharingCounter(attrs)
    for set_name, pairs in pair_sets.items():
        pairs = check_pairs(torch.as_tensor(pairs, dtype=torch.int64).reshape(-1, 2), num_images)
        counter.add(set_name, pairs[:, 0], pairs[:, 1])
    return counter.table()


def attribute_summary(attributes: Mapping[str, torch.Tensor]) -> dict:
    """Per attribute: distinct present values, fraction of images with a value, and the exact chance that two
    distinct random images share a present value (sum_v c_v (c_v - 1) / (N (N - 1))): the baseline to expect."""
    out = {}
    for name, v in attributes.items():
        n = v.shape[0]
        counts = torch.bincount(v[v >= 0]).to(torch.float64) if bool((v >= 0).any()) else torch.zeros(0)
        out[name] = {"values": int((counts > 0).sum()), "present": float((v >= 0).sum()) / n if n else None,
                     "chance_share": float((counts * (counts - 1)).sum()) / (n * (n - 1)) if n > 1 else None}
    return out


def shared_attributes(attrs: Mapping[str, torch.Tensor], i: int, j: int) -> list[str]:
    """The attributes images i and j share: present (>= 0) and equal."""
    return [name for name, v in attrs.items() if int(v[i]) >= 0 and int(v[i]) == int(v[j])]
