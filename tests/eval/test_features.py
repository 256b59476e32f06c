"""Feature extraction for evaluation: image folders and shards, layer/pool choices, the disk cache, clear errors."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastenc.data.synth import write_synthetic_shards
from fastenc.eval.features import DatasetSpec, EvalDataError, FeatureSpec, encoder_checkpoint, extract
from fastenc.models import create_vit


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create_vit("vit_test").eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for cls, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200)), ("emu", (30, 200, 30))):
        os.makedirs(root / cls / "sub")
        for i in range(5):
            arr = np.clip(np.array(color) + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / ("sub" if i == 4 else "") / f"{i}.png")
    (root / "notes.txt").write_text("not a class")
    return str(root)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "s"
    write_synthetic_shards(str(out), 40, image_size=32, samples_per_shard=16, progress=False)
    return str(out)


def test_image_folder_labels_and_classes(encoder, folder):
    f = extract(encoder, DatasetSpec(folder=folder), progress=None)
    assert f.feats.shape == (15, 64) and f.feats.dtype == torch.float32
    torch.testing.assert_close(f.feats.norm(dim=1), torch.ones(15))
    assert f.labels["label"].tolist() == [0] * 5 + [1] * 5 + [2] * 5  # nested images count for their class
    assert f.classes == {"label": ["cat", "dog", "emu"]} and f.captions is None
    assert f.ids[4].endswith(os.path.join("cat", "sub", "4.png"))


def test_shards_labels_captions_and_limit(encoder, shards):
    f = extract(encoder, DatasetSpec(shards=shards, labels=("category_id", "word_id"), captions=True), progress=None)
    assert f.feats.shape == (40, 64) and len(f.captions) == 40 and len(f.ids) == 40
    assert set(f.labels) == {"category_id", "word_id"} and (f.labels["word_id"] == -1).any()  # -1: no word
    assert f.ids[0] == "shard-00000.tar:000000000"  # one ordered pass
    p = extract(encoder, DatasetSpec(shards=shards, labels=("word_id:present",)), progress=None)
    assert torch.equal(p.labels["word_id:present"], (f.labels["word_id"] >= 0).long())  # derived: has a word
    assert 0 < int(p.labels["word_id:present"].sum()) < 40
    with pytest.raises(EvalDataError, match="FIELD:present"):
        extract(encoder, DatasetSpec(shards=shards, labels=("word_id:absent",)), progress=None)
    g = extract(encoder, DatasetSpec(shards=shards, labels=("category_id",), max_samples=10), progress=None)
    assert g.feats.shape == (10, 64) and torch.equal(g.feats, f.feats[:10])


def test_layer_and_pool_choices(encoder, folder):
    base = extract(encoder, DatasetSpec(folder=folder), progress=None).feats
    mean = extract(encoder, DatasetSpec(folder=folder), FeatureSpec(pool="mean"), progress=None).feats
    first = extract(encoder, DatasetSpec(folder=folder), FeatureSpec(layer=0, normalize=False), progress=None).feats
    assert mean.shape == first.shape == base.shape
    assert not torch.allclose(base, mean) and not torch.allclose(first.norm(dim=1), torch.ones(15))
    # layer -1 with pool cls is exactly the encoder's own pooled output, normalized
    from fastenc.data.transforms import image_transform
    from fastenc.data.transforms import decode_image

    x = image_transform(32, train=False)(decode_image(open(os.path.join(folder, "cat", "0.png"), "rb").read()))
    with torch.no_grad():
        torch.testing.assert_close(base[0], torch.nn.functional.normalize(encoder(x[None]), dim=-1)[0])


def test_cache_is_used_and_keyed(encoder, folder, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    ckpt = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(ckpt))
    cache = str(tmp_path / "cache")
    first = extract(encoder, DatasetSpec(folder=folder), checkpoint=str(ckpt), cache_dir=cache, progress=None)
    calls = []
    monkeypatch.setattr(encoder, "forward_features", lambda x: calls.append(1) or 1 / 0)
    again = extract(encoder, DatasetSpec(folder=folder), checkpoint=str(ckpt), cache_dir=cache, progress=None)
    assert not calls and torch.equal(first.feats, again.feats) and again.classes == first.classes
    assert torch.equal(again.labels["label"], first.labels["label"]) and again.ids == first.ids
    with pytest.raises(ZeroDivisionError):  # another spec is another key: recomputed (and here it fails)
        extract(encoder, DatasetSpec(folder=folder), FeatureSpec(pool="mean"), checkpoint=str(ckpt),
                cache_dir=cache, progress=None)
    assert len(os.listdir(cache)) == 1


def test_clear_errors(encoder, folder, tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        extract(encoder, DatasetSpec(folder=str(tmp_path / "nope")), progress=None)
    (tmp_path / "flat").mkdir()
    with pytest.raises(EvalDataError, match="no class subfolders"):
        extract(encoder, DatasetSpec(folder=str(tmp_path / "flat")), progress=None)
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\n")
    with pytest.raises(EvalDataError, match="class-count mismatch: .* 2 class names .* 3 class folders"):
        extract(encoder, DatasetSpec(folder=folder, classes_file=str(names)), progress=None)
    with pytest.raises(EvalDataError, match="dataset shards"):
        extract(encoder, DatasetSpec(shards=str(tmp_path / "missing")), progress=None)
    with pytest.raises(EvalDataError, match="exactly one of"):
        DatasetSpec()
    (tmp_path / "run").mkdir()
    with pytest.raises(EvalDataError, match="has no encoder checkpoint"):
        encoder_checkpoint(str(tmp_path / "run"))
