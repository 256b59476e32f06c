"""Feature extraction for evaluation: image folders and shards, layer/pool choices, the disk cache, clear errors."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastenc.datatools.synth import write_synthetic_shards
from fastenc.eval.features import DatasetSpec, EvalDataError, FeatureSpec, cache_key, encoder_checkpoint, extract
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
    assert f.ids[0] == "shard-00000.tar:000000000"  # a deterministic order (build_loader's seeded shard order)
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
    stem = os.path.splitext(os.listdir(cache)[0])[0]
    assert sorted(os.listdir(cache)) == [stem + ".json", stem + ".safetensors"]  # one entry, no tmp files left


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


def _checkpoint(encoder, tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(ckpt))
    return str(ckpt)


def test_cache_key_follows_the_data_on_disk(encoder, folder, shards, tmp_path):
    ckpt, spec = _checkpoint(encoder, tmp_path), FeatureSpec()
    # shards: a rewrite within the same second (same size) is a new key: every shard's mtime in ns is in the key
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    shard = str(data / "shard-00001.tar")
    os.utime(shard, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    ds = DatasetSpec(shards=str(data))
    before = cache_key(ckpt, ds, spec, 32)
    os.utime(shard, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9 + 500_000_000))
    assert cache_key(ckpt, ds, spec, 32) != before
    # image folders: an image added to a class folder (changes its mtime) is a new key
    root = tmp_path / "folder"
    shutil.copytree(folder, root)
    for d in (root, *root.iterdir()):
        os.utime(d, ns=(0, 0))
    ds = DatasetSpec(folder=str(root))
    before = cache_key(ckpt, ds, spec, 32)
    shutil.copy(root / "cat" / "0.png", root / "dog" / "new.png")
    assert cache_key(ckpt, ds, spec, 32) != before
    # the classes file's content, not its name, is in the key: renamed classes are a new key
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nemu\n")
    ds = DatasetSpec(folder=str(root), classes_file=str(names))
    before = cache_key(ckpt, ds, spec, 32)
    names.write_text("Cat\nDog\nEmu\n")
    assert cache_key(ckpt, ds, spec, 32) != before
    # the caller's extra_key (e.g. the objective file of joint-space features) is in the key
    assert len({cache_key(ckpt, ds, spec, 32), cache_key(ckpt, ds, spec, 32, "objective-a"),
                cache_key(ckpt, ds, spec, 32, "objective-b")}) == 3
    with pytest.raises(EvalDataError, match="dataset shards"):
        cache_key(ckpt, DatasetSpec(shards=str(tmp_path / "missing")), spec, 32)


def test_extra_key_is_a_new_cache_entry(encoder, folder, tmp_path, monkeypatch):
    ckpt, cache = _checkpoint(encoder, tmp_path), str(tmp_path / "cache")
    extract(encoder, DatasetSpec(folder=folder), checkpoint=ckpt, cache_dir=cache, progress=None, extra_key="a")
    monkeypatch.setattr(encoder, "forward_features", lambda x: 1 / 0)
    extract(encoder, DatasetSpec(folder=folder), checkpoint=ckpt, cache_dir=cache, progress=None, extra_key="a")
    with pytest.raises(ZeroDivisionError):  # another extra_key: recomputed
        extract(encoder, DatasetSpec(folder=folder), checkpoint=ckpt, cache_dir=cache, progress=None, extra_key="b")


def test_cache_keeps_ids_in_a_json_sidecar(encoder, folder, tmp_path, monkeypatch):
    from safetensors import safe_open

    ckpt, cache = _checkpoint(encoder, tmp_path), tmp_path / "cache"
    first = extract(encoder, DatasetSpec(folder=folder), checkpoint=ckpt, cache_dir=str(cache), progress=None)
    (sidecar,) = cache.glob("*.json")
    with safe_open(str(sidecar.with_suffix(".safetensors")), "pt") as f:  # ids stay out of the (limited) header
        assert "ids" not in (f.metadata() or {})
    assert json.loads(sidecar.read_text()) == {"ids": first.ids, "captions": None, "classes": first.classes,
                                                  "labels": ["label"]}
    sidecar.unlink()  # an entry without its .json is no entry: recomputed
    monkeypatch.setattr(encoder, "forward_features", lambda x: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        extract(encoder, DatasetSpec(folder=folder), checkpoint=ckpt, cache_dir=str(cache), progress=None)


def test_unwritable_cache_still_returns_features(encoder, folder, tmp_path, monkeypatch, caplog):
    import safetensors.torch
    from safetensors import SafetensorError

    ckpt, blocker = _checkpoint(encoder, tmp_path), tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="fastenc.eval.features"):
        f = extract(encoder, DatasetSpec(folder=folder), checkpoint=ckpt, cache_dir=str(blocker / "cache"),
                    progress=None)
    assert f.feats.shape == (15, 64) and "could not write the feature cache" in caplog.text

    def fail(*args, **kwargs):
        raise SafetensorError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    cache = tmp_path / "cache"
    g = extract(encoder, DatasetSpec(folder=folder), checkpoint=ckpt, cache_dir=str(cache), progress=None)
    assert torch.equal(g.feats, f.feats) and "disk full" in caplog.text
    assert [p.suffix for p in cache.iterdir()] == [".json"]  # no .safetensors, no tmp file: not an entry


def test_folder_ids_are_absolute(encoder, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(folder))
    ckpt, cache = _checkpoint(encoder, tmp_path), str(tmp_path / "cache")
    extract(encoder, DatasetSpec(folder=os.path.basename(folder)), checkpoint=ckpt, cache_dir=cache, progress=None)
    monkeypatch.chdir(tmp_path)  # read back from another working directory: the ids still point at the images
    f = extract(encoder, DatasetSpec(folder=folder), checkpoint=ckpt, cache_dir=cache, progress=None)
    assert all(os.path.isabs(i) and os.path.isfile(i) for i in f.ids)


def test_folder_max_samples_is_a_seeded_random_subset(encoder, folder):
    every = extract(encoder, DatasetSpec(folder=folder), progress=None)
    f = extract(encoder, DatasetSpec(folder=folder, max_samples=6), progress=None)
    g = extract(encoder, DatasetSpec(folder=folder, max_samples=6), progress=None)
    assert f.ids == g.ids and len(f.ids) == 6  # deterministic
    assert f.ids == [i for i in every.ids if i in f.ids]  # kept in sorted order
    assert set(f.labels["label"].tolist()) == {0, 1, 2}  # not just the first classes


def test_folder_rejects_captions_and_other_labels(folder):
    with pytest.raises(EvalDataError, match="image folders have no captions: use shards with .txt"):
        DatasetSpec(folder=folder, captions=True)
    with pytest.raises(EvalDataError, match="only label is 'label'"):
        DatasetSpec(folder=folder, labels=("category_id",))
    DatasetSpec(folder=folder, labels=("label",))


@pytest.mark.parametrize("overrides,pool", [({"global_pool": "avg"}, "mean"), ({"fc_norm": True}, "cls")])
def test_pool_applies_fc_norm(folder, overrides, pool):
    """Encoders that normalize after pooling (`norm` Identity, `fc_norm` a LayerNorm): features = their own output."""
    from fastenc.data.transforms import decode_image, image_transform

    torch.manual_seed(0)
    enc = create_vit("vit_test", **overrides).eval()
    torch.nn.init.normal_(enc.fc_norm.bias)
    feats = extract(enc, DatasetSpec(folder=folder), FeatureSpec(pool=pool), progress=None).feats
    with open(os.path.join(folder, "cat", "0.png"), "rb") as fh:
        x = image_transform(32, train=False)(decode_image(fh.read()))
    with torch.no_grad():
        torch.testing.assert_close(feats[0], torch.nn.functional.normalize(enc(x[None]), dim=-1)[0])


def test_cache_keeps_the_label_order(encoder, shards, tmp_path):
    """Tables list labels in the suite's order; safetensors sorts tensor names, so the cache records the order."""
    from safetensors.torch import save_file

    ckpt = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(ckpt))
    spec = DatasetSpec(shards=shards, labels=("word_id", "category_id", "color_id"), max_samples=8)
    first = extract(encoder, spec, checkpoint=str(ckpt), cache_dir=str(tmp_path / "c"), progress=None)
    again = extract(encoder, spec, checkpoint=str(ckpt), cache_dir=str(tmp_path / "c"), progress=None)
    assert list(first.labels) == list(again.labels) == ["word_id", "category_id", "color_id"]


def test_worker_processes_keep_features_labels_and_ids_aligned(encoder, shards, tmp_path):
    """Extraction with decoding workers gives every sample once, each with its own feature and labels (the order
    of shards may interleave); with max_samples on shards the worker layout is part of the cache key."""
    spec = DatasetSpec(shards=shards, labels=("category_id", "color_id"))
    one = extract(encoder, spec, progress=None)
    two = extract(encoder, spec, num_workers=2, batch_size=8, progress=None)
    assert sorted(two.ids) == sorted(one.ids)
    pos = {i: n for n, i in enumerate(one.ids)}
    order = torch.tensor([pos[i] for i in two.ids])
    torch.testing.assert_close(two.feats, one.feats[order], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(two.labels[k], one.labels[k][order]) for k in one.labels)
    from safetensors.torch import save_file

    ckpt = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(ckpt))
    limited = DatasetSpec(shards=shards, labels=("category_id",), max_samples=10)
    for workers in (0, 2):
        extract(encoder, limited, checkpoint=str(ckpt), cache_dir=str(tmp_path / "c"), num_workers=workers,
                batch_size=4, progress=None)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2
