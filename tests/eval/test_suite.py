"""`fastenc eval RUN_DIR... --suite`: every protocol on real (tiny) CLIP and DINO run dirs, one report; clear errors."""

import json
import os

import pytest
import yaml

from fastenc.cli import main
from fastenc.eval.features import EvalDataError
from fastenc.eval.suite import load_suite, run_suite
from tests.engine.conftest import tiny_data, tiny_overrides, train_isolated  # noqa: F401 - fixture
from tests.engine.test_train import _dino_overrides


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("runs")
    clip = train_isolated("configs/cpu/clip_tiny.yaml",
                          tiny_overrides(tiny_data, root, "schedule.steps=2", "run.name=clip_tiny"))
    dino = train_isolated("configs/cpu/dino_tiny.yaml",
                          _dino_overrides(tiny_data, root, "schedule.steps=2", "run.name=dino_tiny"))
    return clip.run_dir, dino.run_dir


def _suite(tmp_path, tiny_data, **changes):  # noqa: F811
    shards = tiny_data["shards"]
    labels = ["category_id", "color_id", "word_id"]
    suite = {
        "name": "tiny",
        "datasets": {
            "train": {"shards": f"{shards}/shard-{{00000..00001}}.tar", "labels": labels, "captions": True},
            "val": {"shards": f"{shards}/shard-00003.tar", "labels": labels, "captions": True, "max_samples": 96},
        },
        "protocols": {
            "knn": {"train": "train", "test": "val"},
            "linear_probe": {"train": "train", "test": "val", "labels": ["color_id"], "epochs": 4,
                             "warmup_epochs": 1, "search_epochs": 1, "lrs": [1e-2], "wds": [0.0]},
            "zero_shot": {"dataset": "val", "label": "category_id",
                          "class_names": ["circle", "square", "triangle", "star", "cross", "hexagon", "ring",
                                          "heart", "crescent", "arrow"]},
            "retrieval": {"dataset": "val"},
            "pairs": {"dataset": "val", "a": "clip_tiny", "b": "dino_tiny", "attributes": labels,
                      "num_pairs": 2000},
            "loss_curves": {},
        },
    }
    for k, v in changes.items():
        suite["protocols"][k] = v
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return str(path)


def test_suite_runs_every_protocol_and_writes_the_report(runs, tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(["eval", *runs, "--suite", _suite(tmp_path, tiny_data), "--out", str(out)]) == 0
    res = json.load(open(out / "results.json"))
    p = res["protocols"]
    assert set(res["runs"]) == {"clip_tiny", "dino_tiny"}
    for run in ("clip_tiny", "dino_tiny"):
        assert set(p["knn"]["results"][run]) == {"category_id", "color_id", "word_id"}
        assert 0 <= p["linear_probe"]["results"][run]["color_id"]["best_accuracy"] <= 1
    assert p["zero_shot"]["results"]["dino_tiny"] == {"skipped": "no text tower"}
    assert "top1" in json.dumps(p["zero_shot"]["results"]["clip_tiny"]).lower().replace("@", "")
    assert any("R@1" in k for k in p["retrieval"]["results"]["clip_tiny"])
    assert "skipped" not in p["pairs"]["results"]
    report = open(out / "report.md").read()
    for section in ("## knn", "## linear_probe", "## zero_shot", "## retrieval", "## pairs", "## loss_curves"):
        assert section in report
    assert os.path.isfile(out / "loss_curves.png")
    assert any(f.endswith(".png") and "pair" in f for f in os.listdir(out))
    # features were cached: a second run reads them
    assert os.listdir(out / "feature_cache")


def test_clear_errors(runs, tiny_data, tmp_path):  # noqa: F811
    bad = _suite(tmp_path, tiny_data, knn={"train": "nope", "test": "val"})
    with pytest.raises(EvalDataError, match="which `datasets:` does not define"):
        load_suite(bad)
    s = yaml.safe_load(open(_suite(tmp_path, tiny_data)))
    s["datasets"]["val"]["shards"] = str(tmp_path / "missing")
    (tmp_path / "s2.yaml").write_text(yaml.safe_dump(s))
    with pytest.raises(EvalDataError, match="does not exist"):
        run_suite(list(runs), str(tmp_path / "s2.yaml"), str(tmp_path / "o2"))
    few = _suite(tmp_path, tiny_data, zero_shot={"dataset": "val", "label": "category_id", "class_names": ["a", "b"]})
    with pytest.raises(EvalDataError, match="class-count mismatch"):
        run_suite([runs[0]], few, str(tmp_path / "o3"))
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(EvalDataError, match="no encoder checkpoint"):
        run_suite([str(tmp_path / "unfinished")], _suite(tmp_path, tiny_data), str(tmp_path / "o4"))
    assert main(["eval", str(tmp_path / "unfinished"), "--suite", _suite(tmp_path, tiny_data), "--out",
                 str(tmp_path / "o5")]) == 2
