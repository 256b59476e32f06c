"""`fastenc eval RUN_DIR... --suite`: every protocol on real (tiny) CLIP and DINO run dirs, one report; clear errors."""

import json
import os

import pytest
import torch
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
    words = {"dataset": "val", "label": "word_id", "templates": ['the word "{}"'],
             "class_names": ["cat", "dog", "sun", "moon", "tree", "fish", "bird", "book", "cake", "door", "frog",
                             "kite", "lamp", "milk", "note", "rain", "rose", "wolf", "zero", "jazz"]}
    suite = _suite(tmp_path, tiny_data, **{"zero_shot.word": words})  # TYPE.TAG: a second zero-shot
    assert main(["eval", *runs, "init:" + runs[0], "--suite", suite, "--out", str(out)]) == 0
    res = json.load(open(out / "results.json"))
    p = res["protocols"]
    assert set(res["runs"]) == {"clip_tiny", "dino_tiny", "clip_tiny@init"}
    assert res["made_by"]["command"].startswith("fastenc eval ") and res["made_by"]["git"]  # provenance
    assert set(p["knn"]["results"]["clip_tiny@init"]) == {"category_id", "color_id", "word_id"}
    assert "top1" in json.dumps(p["zero_shot"]["results"]["clip_tiny@init"]).lower().replace("@", "")
    for run in ("clip_tiny", "dino_tiny"):
        assert set(p["knn"]["results"][run]) == {"category_id", "color_id", "word_id"}
        assert 0 <= p["linear_probe"]["results"][run]["color_id"]["best_accuracy"] <= 1
    assert p["zero_shot"]["results"]["dino_tiny"] == {"skipped": "no text tower"}
    assert "top1" in json.dumps(p["zero_shot"]["results"]["clip_tiny"]).lower().replace("@", "")
    # images without a word (word_id -1) are left out of the word zero-shot rather than failing it
    assert set(p["zero_shot.word"]["results"]["clip_tiny"]) == {"top1", "top5"}
    assert p["zero_shot.word"]["results"]["dino_tiny"] == {"skipped": "no text tower"}
    assert any("R@1" in k for k in p["retrieval"]["results"]["clip_tiny"])
    assert "skipped" not in p["pairs"]["results"]
    report = open(out / "report.md").read()
    assert report.splitlines()[2].startswith("Made by `fastenc eval ")
    for section in ("## knn", "## linear_probe", "## zero_shot", "## zero_shot.word", "## retrieval", "## pairs",
                    "## loss_curves"):
        assert section in report
    assert os.path.isfile(out / "loss_curves.png") and os.path.isfile(out / "attributes.png")
    assert "![accuracy per attribute](attributes.png)" in report
    # the majority-class floor: computed from the test labels, and one row of each accuracy table
    from fastenc.eval.features import DatasetSpec, extract
    from fastenc.eval.runs import load_run

    y = extract(load_run(runs[0]).encoder, DatasetSpec(shards=f"{tiny_data['shards']}/shard-00003.tar",
                                                       labels=("color_id",), max_samples=96)).labels["color_id"]
    expected = torch.bincount(y[y >= 0]).max().item() / int((y >= 0).sum())
    assert p["knn"]["majority"]["color_id"] == pytest.approx(expected)
    assert p["linear_probe"]["majority"] == {"color_id": pytest.approx(expected)}
    assert report.count("| *majority class* |") == 2
    assert sorted(os.listdir(out / "pairs")) == ["pairs.json", "pairs_clip_tiny_high.png", "pairs_dino_tiny_high.png",
                                                 "sharing.md"]
    assert "![clip_tiny_high](pairs/pairs_clip_tiny_high.png)" in report
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


@pytest.mark.parametrize("recipe", ["clip", "dino"])
def test_init_baseline_is_the_runs_weights_before_step_1(recipe, tiny_data, tmp_path):  # noqa: F811
    """init:RUN_DIR rebuilds the run's initial weights: a run trained with lr 0 exports exactly them (DINO: its
    teacher, which the EMA of an unchanged student leaves in place up to rounding)."""
    from fastenc.eval.runs import load_run

    extra = ("schedule.steps=1", "schedule.warmup_steps=0", "optim.lr=0.0", f"run.name={recipe}_lr0")
    overrides = (tiny_overrides(tiny_data, tmp_path, *extra) if recipe == "clip"
                 else _dino_overrides(tiny_data, tmp_path, *extra))
    run_dir = train_isolated(f"configs/cpu/{recipe}_tiny.yaml", overrides).run_dir
    trained, init = load_run(run_dir), load_run("init:" + run_dir)
    assert init.name == f"{recipe}_lr0@init" and init.has_text == (recipe == "clip")
    a, b = trained.encoder.state_dict(), init.encoder.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6 if recipe == "dino" else 0, msg=k)
    # deterministic, and the run's own seed: the same config with another seed gives other weights
    assert all(torch.equal(load_run("init:" + run_dir).encoder.state_dict()[k], b[k]) for k in b)
    cfg = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    cfg["run"]["seed"] += 1
    (tmp_path / "reseeded").mkdir()
    (tmp_path / "reseeded" / "config.yaml").write_text(yaml.safe_dump(cfg))
    other = load_run("init:" + str(tmp_path / "reseeded")).encoder.state_dict()
    assert not torch.equal(other["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])


def test_pair_grid_image_loader_reads_the_right_samples(tiny_data):  # noqa: F811
    """The shard loader seeks to each image through one header scan per shard; it must return the same pixels as a
    full read of the tar, for any sample of any shard, and name a sample it cannot find."""
    import numpy as np

    from fastenc.data.index import iter_tar_samples
    from fastenc.data.transforms import decode_image
    from fastenc.eval.features import DatasetSpec
    from fastenc.eval.suite import _image_loader

    shards = [f"{tiny_data['shards']}/shard-0000{i}.tar" for i in (1, 2)]
    expected, ids = [], []
    for path in shards:
        for n, (key, members) in enumerate(iter_tar_samples(path)):
            if n in (0, 7, 127):
                ids.append(f"{os.path.basename(path)}:{key}")
                expected.append(np.asarray(decode_image(members["jpg"][1])))
    spec = DatasetSpec(shards=f"{tiny_data['shards']}/shard-{{00001..00002}}.tar")
    load = _image_loader(spec, ids + ["shard-00001.tar:nope"])
    order = [5, 0, 3, 1, 4, 2]  # out of order, across shards
    for i in order:
        assert np.array_equal(np.asarray(load(i)), expected[i])
    with pytest.raises(EvalDataError, match="nope not found"):
        load(len(ids))


def test_suite_argument_checks(runs, tiny_data, tmp_path):  # noqa: F811
    with pytest.raises(EvalDataError, match=r"unknown arguments \['temprature'\]"):
        load_suite(_suite(tmp_path, tiny_data, knn={"train": "train", "test": "val", "temprature": 0.1}))
    with pytest.raises(EvalDataError, match="protocol knn needs test"):
        load_suite(_suite(tmp_path, tiny_data, knn={"train": "train"}))
    with pytest.raises(EvalDataError, match="share a name.*NAME=RUN_DIR"):
        run_suite([runs[0], runs[0]], _suite(tmp_path, tiny_data), str(tmp_path / "o"))


def test_a_failing_protocol_is_reported_after_the_others_ran(runs, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """One protocol with data it cannot use (pairs on an attribute the dataset lacks) is recorded with its error;
    the rest still run, report.md and results.json are written, then the command fails naming it. Runs are named
    on the command line (NAME=SOURCE), and a label no sample has is a skipped cell, not a number."""
    suite = _suite(tmp_path, tiny_data,
                   pairs={"dataset": "val", "a": "c", "b": "d", "attributes": ["shape_id"], "num_pairs": 100},
                   knn={"train": "train", "test": "val", "labels": ["color_id", "word_id"]},
                   linear_probe={"train": "train", "test": "val", "labels": ["color_id"], "epochs": 2,
                                 "warmup_epochs": 1, "search_epochs": 1, "lrs": [1e-2], "wds": [0.0]})
    out = tmp_path / "out"
    assert main(["eval", "c=" + runs[0], "d=" + runs[1], "--suite", suite, "--out", str(out)]) == 2
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"c", "d"}
    p = res["protocols"]
    assert "shape_id" in p["pairs"]["error"] and "results" not in p["pairs"]
    assert set(p["knn"]["results"]["c"]) == {"color_id", "word_id"} and "top1" in json.dumps(p["zero_shot"])
    report = (out / "report.md").read_text()
    assert "**failed:**" in report and "## retrieval" in report
    # every word_id of the val split absent: the cell is n/a with the reason
    s = yaml.safe_load(open(suite))
    s["datasets"]["val"]["labels"] = ["color_id", "word_id"]
    s["datasets"]["val"]["max_samples"] = 96
    for proto in ("pairs", "zero_shot", "retrieval", "linear_probe", "loss_curves"):
        s["protocols"].pop(proto)
    import fastenc.eval.suite as S
    from fastenc.eval.features import Features

    real_get = S._Features.get

    def no_word_in_val(self, run, dataset, joint=False):
        f = real_get(self, run, dataset, joint)
        if dataset == "val":
            f = Features(f.feats, {**f.labels, "word_id": torch.full_like(f.labels["word_id"], -1)}, f.captions, f.ids)
        return f

    monkeypatch.setattr(S._Features, "get", no_word_in_val)
    (tmp_path / "s2.yaml").write_text(yaml.safe_dump(s))
    res = run_suite(["c=" + runs[0]], str(tmp_path / "s2.yaml"), str(tmp_path / "o2"))
    assert res["protocols"]["knn"]["results"]["c"]["word_id"] == {"skipped": "no sample of 'val' has a 'word_id' "
                                                                              "label (all -1)"}
    saved = json.loads((tmp_path / "o2" / "results.json").read_text())  # strict JSON: the NaN majority is null
    assert saved["protocols"]["knn"]["majority"]["word_id"] is None
    assert "n/a for word_id" in (tmp_path / "o2" / "report.md").read_text()


def test_a_run_whose_text_side_cannot_load_still_gets_image_protocols(runs, tiny_data, tmp_path):  # noqa: F811
    import shutil

    broken = tmp_path / "clip_broken"
    shutil.copytree(runs[0], broken)
    os.remove(broken / "export" / "objective.safetensors")
    res = run_suite([f"b={broken}"], _suite(tmp_path, tiny_data, pairs={"dataset": "val", "num_pairs": 10}),
                    str(tmp_path / "o"))
    assert "objective.safetensors is missing" in res["protocols"]["zero_shot"]["results"]["b"]["skipped"]
    assert "objective.safetensors is missing" in res["protocols"]["retrieval"]["results"]["b"]["skipped"]
    assert 0 <= res["protocols"]["knn"]["results"]["b"]["color_id"] <= 1


def test_zero_shot_refuses_wordnet_ids_as_class_names(runs, tmp_path):  # noqa: F811
    from PIL import Image

    for wnid in ("n01440764", "n01443537"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(tmp_path / "val" / wnid / f"{i}.png")
    suite = {"name": "wnid", "datasets": {"val": {"folder": str(tmp_path / "val")}},
             "protocols": {"zero_shot": {"dataset": "val"}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    with pytest.raises(EvalDataError, match="WordNet ids .*classes_file"):
        run_suite([runs[0]], str(tmp_path / "s.yaml"), str(tmp_path / "o"))
    (tmp_path / "names.txt").write_text("tench\ngoldfish\n")
    suite["datasets"]["val"]["classes_file"] = str(tmp_path / "names.txt")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(suite))
    res = run_suite([runs[0]], str(tmp_path / "s.yaml"), str(tmp_path / "o"))
    assert "skipped" not in res["protocols"]["zero_shot"]["results"]["clip_tiny"]


def test_launcher_form(runs, tiny_data, tmp_path):  # noqa: F811
    """python launch/evaluate.py is the same command: a report with its own command line, exit 2 on bad input."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    suite = _suite(tmp_path, tiny_data, pairs={"dataset": "val", "num_pairs": 10})
    s = yaml.safe_load(open(suite))
    for proto in ("linear_probe", "zero_shot", "retrieval"):  # a short suite: k-NN, pairs, loss curves
        s["protocols"].pop(proto)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(s))
    cmd = [sys.executable, os.path.join(root, "launch", "evaluate.py"), runs[1], "--suite", suite, "--workers", "2",
           "--out"]
    done = subprocess.run([*cmd, str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    made = json.loads((tmp_path / "out" / "results.json").read_text())["made_by"]
    assert made["command"].startswith("python launch/evaluate.py ")
    bad = subprocess.run([*cmd[:2], str(tmp_path / "nope"), *cmd[3:], str(tmp_path / "o2")], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_a_timm_format_checkpoint_without_fastenc_metadata(tiny_data, tmp_path):  # noqa: F811
    """A bare ViT .safetensors that fastenc did not export (no metadata; a timm classifier with its head) is
    evaluated once --model names its preset; without it, the error says so."""
    from safetensors.torch import save_file

    from fastenc.models import create_vit

    torch.manual_seed(0)
    vit = create_vit("vit_test", num_classes=7)
    path = tmp_path / "timm_vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    suite = _suite(tmp_path, tiny_data, knn={"train": "train", "test": "val", "labels": ["color_id"]})
    s = yaml.safe_load(open(suite))
    s["protocols"] = {"knn": s["protocols"]["knn"]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(s))
    with pytest.raises(EvalDataError, match="no 'model' metadata.*--model"):
        run_suite([str(path)], suite, str(tmp_path / "o"))
    out = tmp_path / "o2"
    assert main(["eval", f"timm={path}", "--model", "vit_test", "--suite", suite, "--out", str(out)]) == 0
    assert 0 <= json.loads((out / "results.json").read_text())["protocols"]["knn"]["results"]["timm"]["color_id"] <= 1
    with pytest.raises(EvalDataError, match="size mismatch|Missing key|Unexpected key"):
        run_suite([str(path)], suite, str(tmp_path / "o3"), model="vit_cpu_patch8_64")


def test_summary_lines_state_each_headline_against_chance():
    from fastenc.eval.suite import summary_lines

    results = {"protocols": {
        "zero_shot.color": {"args": {"label": "color_id", "class_names": ["red", "blue", "green", "black"]},
                            "results": {"demo": {"top1": 0.875, "top5": 1.0}, "dino": {"skipped": "no text tower"}}},
        "knn": {"args": {}, "majority": {"category_id": 0.12},
                "results": {"demo": {"category_id": 0.5}, "demo@init": {"category_id": 0.11}}},
        "retrieval": {"args": {}, "results": {"demo": {"i2t": 0.3}}}}}
    assert summary_lines(results) == [
        "zero_shot.color: which color is it, by text prompts alone: demo 87.5% (chance 1 in 4 = 25.0%)",
        "knn category_id: demo 50.0%, demo@init 11.0% (majority class 12.0%)"]
