"""Report figures (fastenc.analysis.curves) and the metrics history they read."""

import json

from PIL import Image

from fastenc.analysis.curves import plot_attribute_accuracy, plot_loss_curves
from fastenc.run.metrics import metrics_history


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metrics_history_keeps_the_resumed_rows_once(tmp_path):
    """A run that logged steps 1-5, crashed, and resumed from its step-3 checkpoint appends steps 4-6 again: the
    history is steps 1-6 once each, 4 and 5 from the resumed run."""
    path = tmp_path / "metrics.jsonl"
    first = [{"step": s, "loss": 10.0 - s, "samples_seen": 8 * s} for s in range(1, 6)]
    resumed = [{"step": s, "loss": 20.0 - s, "samples_seen": 8 * s} for s in range(4, 7)]
    _write(path, first + [{"message": "resumed"}] + resumed)
    hist = metrics_history(str(path))
    assert [r["step"] for r in hist] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in hist] == [9.0, 8.0, 7.0, 16.0, 15.0, 14.0]
    png = plot_loss_curves([str(path)], str(tmp_path / "loss.png"), labels=["run"])
    assert Image.open(png).size[0] > 0


def test_attribute_accuracy_figure(tmp_path):
    tables = {"knn": {"clip": {"color_id": 0.9, "category_id": 0.2}, "dino": {"color_id": 0.95}},
              "linear_probe": {"clip": {"color_id": 0.99, "category_id": 0.3}, "dino": {"color_id": 0.97}}}
    png = plot_attribute_accuracy(tables, str(tmp_path / "a.png"), baseline={"color_id": 0.11, "category_id": 0.1})
    w, h = Image.open(png).size
    assert w > h > 0  # two panels side by side
    assert not list(tmp_path.glob("*.tmp.png"))  # written atomically
