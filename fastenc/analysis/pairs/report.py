"""What a scan means in words and numbers: the JSON-ready result of analyze_pairs (pairs_result: setup, cosine
statistics, each side's count and kept pairs, attribute sharing, with sides and sets named after the encoders) and
its markdown (report_markdown for sharing.md, sharing_markdown for the attribute-sharing table). Depends on scan,
selection and sharing."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch

from fastenc.analysis.pairs.scan import PairScan
from fastenc.analysis.pairs.selection import SideSelection
from fastenc.analysis.pairs.sharing import attribute_summary, shared_attributes


def _side_records(side: SideSelection, names: Sequence[str], attrs: dict[str, torch.Tensor]) -> list[dict]:
    a, b = names
    out = []
    for r in range(len(side)):
        rec = {"rank": r + 1}
        if side.pairs is not None:
            i, j = int(side.pairs[r, 0]), int(side.pairs[r, 1])
            rec.update(i=i, j=j)
        rec.update({f"cos_{a}": float(side.cos_a[r]), f"cos_{b}": float(side.cos_b[r]), "gap": float(side.gap[r])})
        if attrs and side.pairs is not None:
            rec["same"] = shared_attributes(attrs, i, j)
            rec["attributes"] = {n: [int(v[i]), int(v[j])] for n, v in attrs.items()}
        out.append(rec)
    return out


def pairs_result(scan: PairScan, names: Sequence[str], *, dims: Sequence[int], max_pairs: int, seed: int,
                 unique: bool) -> dict:
    """analyze_pairs' result without its files and timings: the setup, the cuts, the cosine statistics, each side
    ("<a>_high", "<b>_high") with its count and kept pairs, and with attributes their summary and sharing table."""
    an, bn = names
    rename = {"all": "all", "a_high": f"{an}_high", "a_high_top": f"{an}_high_top", "b_high": f"{bn}_high",
              "b_high_top": f"{bn}_high_top"}
    st = scan.stats
    result = {
        "names": list(names), "num_images": scan.num_images, "dims": [int(d) for d in dims],
        "mode": "exhaustive" if scan.exhaustive else "sample", "num_pairs": scan.num_pairs,
        "seed": None if scan.exhaustive else seed, "unique": None if scan.exhaustive else unique,
        "thresholds": dataclasses.asdict(scan.thresholds), "criteria": scan.thresholds.describe(names, scan.quantiles),
        "quantiles": dataclasses.asdict(scan.quantiles) if scan.quantiles else None, "max_pairs": max_pairs,
        "cosine_stats": {"pairs": st["pairs"], **({f"mean_{an}": st["mean_a"], f"std_{an}": st["std_a"],
                                                    f"mean_{bn}": st["mean_b"], f"std_{bn}": st["std_b"],
                                                    "corr": st["corr"]} if st["pairs"] else {})},
        "sides": {},
    }
    for key, side in ((f"{an}_high", scan.a_high), (f"{bn}_high", scan.b_high)):
        result["sides"][key] = {"criterion": result["criteria"][key], "count": side.count,
                                "fraction": side.count / scan.num_pairs if scan.num_pairs else None,
                                "kept": len(side), "top": _side_records(side, names, scan.attributes)}
    if scan.attributes:
        result["attributes"] = attribute_summary(scan.attributes)
        result["sharing"] = {rename[s]: rows for s, rows in scan.sharing.items()}
    return result


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def sharing_markdown(sharing: Mapping[str, Mapping[str, Mapping]], *, labels: Mapping[str, str] | None = None,
                     chance: Mapping[str, Mapping] | None = None) -> str:
    """Markdown table: one row per attribute (two more for attributes with absent values), one column per pair
    set (headed by labels[set] or the set's name, with its pair count). chance: attribute_summary's output, for
    an extra "chance" column."""
    sets = list(sharing)
    if not sets:
        return "(no pair sets)\n"
    attrs = list(next(iter(sharing.values())))
    if not attrs:
        return "(no attributes)\n"
    labels = labels or {}
    head = ["attribute"] + [f"{labels.get(s, s)} ({next(iter(sharing[s].values()))['pairs']:,})" for s in sets]
    if chance:
        head.append("chance")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in attrs:
        rows = [(f"{a}: same", "share", "chance_share")]
        if "both_present" in next(iter(sharing.values()))[a]:
            rows = [(f"{a}: both present", "both_present", None),
                    (f"{a}: same (both present)", "share", "chance_share"),
                    (f"{a}: same, given both present", "share_if_present", None)]
        for title, key, chance_key in rows:
            cells = [title] + [_pct(sharing[s][a].get(key)) for s in sets]
            if chance:
                cells.append(_pct(chance.get(a, {}).get(chance_key)) if chance_key else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(result: Mapping) -> str:
    """sharing.md: the setup, the count of each side, and the attribute-sharing table of an analyze_pairs result."""
    an, bn = result["names"]
    lines = [f"# {an} vs {bn}: pairs one encoder finds similar and the other does not", "",
             f"{result['num_images']:,} images, {result['num_pairs']:,} pairs ({result['mode']}"
             + (f", seed {result['seed']}" if result["mode"] == "sample" else "") + ").", ""]
    cs = result.get("cosine_stats", {})
    if cs.get("pairs"):
        corr = cs.get("corr")
        lines += [f"Cosine over all pairs: {an} {cs[f'mean_{an}']:.3f} +- {cs[f'std_{an}']:.3f}, "
                  f"{bn} {cs[f'mean_{bn}']:.3f} +- {cs[f'std_{bn}']:.3f}, correlation "
                  + ("-" if corr is None else f"{corr:.3f}") + ".", ""]
    lines += ["| pair set | criterion | pairs | fraction of all |", "|---|---|---|---|"]
    for key, side in result["sides"].items():
        lines.append(f"| {key} | {side['criterion']} | {side['count']:,} | {_pct(side['fraction'])} |")
    lines.append("")
    if result.get("sharing"):
        k = result["max_pairs"]
        labels = {"all": "all pairs", f"{an}_high": f"{an}-high", f"{an}_high_top": f"{an}-high top {k}",
                  f"{bn}_high": f"{bn}-high", f"{bn}_high_top": f"{bn}-high top {k}"}
        lines += ["Fraction of pairs whose two images share each attribute (\"same\": equal and present):", "",
                  sharing_markdown(result["sharing"], labels=labels, chance=result.get("attributes"))]
    else:
        lines += ["(no attribute table: no sharing statistics)", ""]
    return "\n".join(lines)
