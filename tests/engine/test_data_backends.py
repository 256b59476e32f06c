"""Every objective trains through both data backends (acceptance of the DALI issue), and a run resumed on DALI
continues the data stream exactly: its losses after the resume equal those of an uninterrupted run."""

import json
import os

import numpy as np
import pytest

from fastenc.run.metrics import read_metrics
from tests.engine.conftest import tiny_overrides, train_isolated
from tests.engine.test_train import _dino_overrides

RECIPE = {"clip": "configs/cpu/clip_tiny.yaml", "siglip": "configs/cpu/siglip_tiny.yaml",
          "dino": "configs/cpu/dino_tiny.yaml"}


def _overrides(objective, tiny_data, tmp_path, *extra):
    if objective == "dino":
        return _dino_overrides(tiny_data, tmp_path, "engine.zero_stage=2", *extra)
    return tiny_overrides(tiny_data, tmp_path, "engine.zero_stage=2", *extra)


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("objective", ["clip", "siglip", "dino"])
def test_objective_trains_through_each_backend(objective, backend, tiny_data, tmp_path):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    res = train_isolated(RECIPE[objective], _overrides(objective, tiny_data, tmp_path, "schedule.steps=3",
                                                       f"data.backend={backend}", f"run.name={objective}"),
                         export=False, plot=False)
    rows = read_metrics(res.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["num_skipped"] == 0 and r["num_excluded"] == 0 for r in rows)
    assert f"backend: {backend}" in open(os.path.join(res.run_dir, "config.yaml")).read()


@pytest.mark.parametrize("objective", ["clip", "dino"])
def test_dali_resume_continues_the_data_stream_exactly(objective, tiny_data, tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    common = ("schedule.steps=6", "engine.checkpoint_every=3", "data.backend=dali", "data.resampled=false",
              "engine.zero_stage=0")
    whole = train_isolated(RECIPE[objective], _overrides(objective, tiny_data, tmp_path / "a", *common, "run.name=w"),
                           export=False, plot=False)
    ov = _overrides(objective, tiny_data, tmp_path / "b", *common, "run.name=r")
    first = train_isolated(RECIPE[objective], ov, max_steps=3, export=False, plot=False)
    state = json.load(open(os.path.join(first.run_dir, "checkpoints", "step00000003", "data", "rank0.json")))
    assert state["backend"] == "dali" and state["batch_in_epoch"] == 3 and state["checkpoint"]
    second = train_isolated(RECIPE[objective], ov, resume=first.run_dir, export=False, plot=False)
    expected = [r["loss"] for r in read_metrics(whole.metrics_path)]
    got = [r["loss"] for r in read_metrics(second.metrics_path)]
    assert len(expected) == len(got) == 6
    # Same model, optimizer and schedule state after the resume (earlier tests), and the same batches: equal losses.
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ingested_image_folder_trains(tiny_data, tmp_path):
    """`fastenc data ingest` on an image folder with a captions CSV gives shards the trainer trains on (DALI)."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    import csv
    import tarfile

    from fastenc.cli import main

    src = tmp_path / "photos"
    src.mkdir()
    rows = []
    with tarfile.open(os.path.join(tiny_data["shards"], "shard-00000.tar")) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name, data in members.items():
        if name.endswith(".jpg"):
            key = name[:-4]
            (src / f"img_{key}.jpg").write_bytes(data)
            rows.append({"file": f"img_{key}.jpg", "caption": members[f"{key}.txt"].decode()})
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    assert main(["data", "ingest", str(src), "--out", str(tmp_path / "shards"), "--captions",
                 str(tmp_path / "captions.csv"), "--samples-per-shard", "64"]) == 0
    res = train_isolated(RECIPE["clip"], _overrides("clip", tiny_data, tmp_path, "schedule.steps=3",
                                                    "data.backend=dali", f"data.train_shards={tmp_path / 'shards'}"),
                         export=False, plot=False)
    rows = read_metrics(res.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["num_excluded"] == 0
