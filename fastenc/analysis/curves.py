"""Report figures: loss curves of several runs on one figure (the paper's Figure 4 shape, from metrics.jsonl files)
and per-attribute accuracy bars (what each encoder encodes)."""

from __future__ import annotations

import os

from fastenc.utils.atomic import save_figure
from fastenc.utils.optional import require


def plot_loss_curves(metrics_paths: list[str], out_png: str, *, labels: list[str] | None = None,
                     x: str = "samples_seen", y: str = "loss") -> str:
    """Plot `y` against `x` for each run; returns the PNG path (written atomically)."""
    from fastenc.run.metrics import metrics_history

    mpl = require("matplotlib", "loss-curve plots")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.dirname(p)) for p in metrics_paths]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for path, label in zip(metrics_paths, labels):
        rows = [r for r in metrics_history(path) if y in r and x in r]
        ax.plot([r[x] for r in rows], [r[y] for r in rows], label=label)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_png)


def plot_attribute_accuracy(tables: dict[str, dict[str, dict[str, float]]], out_png: str, *,
                            baseline: dict[str, float] | None = None) -> str:
    """Grouped bars, one panel per protocol: tables[protocol][run][attribute] = accuracy in [0, 1]; `baseline`
    (attribute -> accuracy, e.g. the majority class) is drawn as a dashed tick over each group."""
    mpl = require("matplotlib", "report figures")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 3.8), dpi=120, squeeze=False)
    for ax, (proto, table) in zip(axes[0], tables.items()):
        runs = list(table)
        attrs = sorted({a for r in table.values() for a in r})
        width = 0.8 / max(len(runs), 1)
        for i, run in enumerate(runs):
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(attrs))]
            ax.bar(xs, [100 * table[run].get(a, float("nan")) for a in attrs], width, label=run)
        for j, a in enumerate(attrs):
            if baseline and a in baseline:
                ax.hlines(100 * baseline[a], j - 0.45, j + 0.45, colors="k", linestyles="--", linewidth=1,
                          label="majority class" if j == 0 else None)
        ax.set_xticks(range(len(attrs)), [a.replace("_id", "").replace(":", " ") for a in attrs])
        ax.set_ylim(0, 118)  # headroom for the legend row above 100 %
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("top-1 accuracy, %")
        ax.set_title(proto.replace("_", " "))
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7, loc="upper center", ncol=4, frameon=False)
    return save_figure(fig, out_png)
