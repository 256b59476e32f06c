"""Loss curves of one or several runs on one figure (the paper's Figure 4 shape), from metrics.jsonl files."""

from __future__ import annotations

import os

from fastenc.utils.optional import require


def plot_loss_curves(metrics_paths: list[str], out_png: str, *, labels: list[str] | None = None,
                     x: str = "samples_seen", y: str = "loss") -> str:
    """Plot `y` against `x` for each run; returns the PNG path (written atomically)."""
    from fastenc.engine.logging import read_metrics

    mpl = require("matplotlib", "loss-curve plots")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.dirname(p)) for p in metrics_paths]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for path, label in zip(metrics_paths, labels):
        rows = [r for r in read_metrics(path) if y in r and x in r]
        ax.plot([r[x] for r in rows], [r[y] for r in rows], label=label)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_png)


def save_figure(fig, out_png: str) -> str:
    """tight_layout, write to a temporary file, close the figure, rename into place (never a half-written PNG)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
