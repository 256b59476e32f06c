"""The DALI data path against its reference twin (the torch path), exact resume, sharding, and corrupt data."""

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install nvidia-dali-cuda130)")
pytest.importorskip("numba", reason="numba is not installed (DALI-cpu multi-crop kernel)")

import torchvision.transforms.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from fastenc.data import dali_numba as K  # noqa: E402
from fastenc.data import spec as S  # noqa: E402
from fastenc.data.dali import DaliLoader, build_pipeline  # noqa: E402
from fastenc.data.index import build_index, ensure_indexes, read_report  # noqa: E402
from fastenc.data.loader import build_loader  # noqa: E402
from fastenc.data.shards import expand_shards  # noqa: E402
from fastenc.data.spec import ImageNormalizer, ImageTextSpec, MultiCropSpec  # noqa: E402
from fastenc.datatools.synth import write_synthetic_shards  # noqa: E402
from fastenc.data.transforms import torch_sample_fn  # noqa: E402

MEAN = np.array(S.OPENAI_CLIP_MEAN)[:, None, None]
STD = np.array(S.OPENAI_CLIP_STD)[:, None, None]


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("dali") / "synth"
    write_synthetic_shards(str(out), 240, image_size=64, samples_per_shard=60, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def coords(tmp_path_factory):
    """PNG images (lossless) whose red channel codes x and green codes y: a crop's value range is its extent."""
    out = tmp_path_factory.mktemp("coords")
    W, H = 160, 120
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    arr = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    for s in range(2):
        with tarfile.open(out / f"c-{s}.tar", "w") as tar:
            for i in range(64):
                key = f"{s * 64 + i:09d}"
                _add(tar, f"{key}.png", buf.getvalue())
                _add(tar, f"{key}.txt", b"a coordinate image")
    ensure_indexes(expand_shards(str(out)), progress=False)
    return str(out)


# ----------------------------------------------------------------------------------------------------------------
# the fused CPU kernel against torchvision, op by op


def _kernel(img_hwc, params):
    row = np.array([params], np.float32)
    H, W, _ = img_hwc.shape
    out = np.empty((1, 3, H, W), np.uint8)
    K.augment_crops(out, img_hwc[None], row)
    return torch.from_numpy(out[0])


def _norm(t):
    return (t - torch.from_numpy(MEAN).float()) / torch.from_numpy(STD).float()


def _reference_blur(t, sigma):
    r = int(np.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = (k / k.sum()).float()
    x = torch.nn.functional.pad(t[None], (r, r, r, r), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)[0]


@pytest.mark.parametrize("name,params,ref", [
    ("identity", [0, 0, 1, 1, 1, 0, 0, 0, 0, 0], lambda t: t),
    ("flip", [1, 0, 1, 1, 1, 0, 0, 0, 0, 0], F.hflip),
    ("brightness", [0, 1, 1.3, 1, 1, 0, 0, 0, 0, 0], lambda t: F.adjust_brightness(t, 1.3)),
    ("contrast", [0, 1, 1, 0.7, 1, 0, 0, 0, 0, 0], lambda t: F.adjust_contrast(t, 0.7)),
    ("saturation", [0, 1, 1, 1, 1.2, 0, 0, 0, 0, 0], lambda t: F.adjust_saturation(t, 1.2)),
    ("hue+", [0, 1, 1, 1, 1, 0.08, 0, 0, 0, 0], lambda t: F.adjust_hue(t, 0.08)),
    ("hue-", [0, 1, 1, 1, 1, -0.1, 0, 0, 0, 0], lambda t: F.adjust_hue(t, -0.1)),
    ("grayscale", [0, 0, 1, 1, 1, 0, 0, 1, 0, 0], lambda t: F.rgb_to_grayscale(t, 3)),
    ("solarize", [0, 0, 1, 1, 1, 0, 0, 0, 0, 1], lambda t: F.solarize(t, 128 / 255)),
    # order code 23 = permutation (hue, saturation, contrast, brightness); 9 = (1, 2, 3, 0)
    ("jitter order 23", [0, 1, 1.3, 0.7, 1.2, 0.05, 23, 0, 0, 0],
     lambda t: F.adjust_brightness(F.adjust_contrast(F.adjust_saturation(F.adjust_hue(t, 0.05), 1.2), 0.7), 1.3)),
    ("jitter order 9", [0, 1, 0.8, 1.4, 0.9, -0.03, 9, 0, 0, 0],
     lambda t: F.adjust_brightness(F.adjust_hue(F.adjust_saturation(F.adjust_contrast(t, 1.4), 0.9), -0.03), 0.8)),
    ("blur", [0, 0, 1, 1, 1, 0, 0, 0, 1.3, 0], lambda t: _reference_blur(t, 1.3)),
    ("everything", [1, 1, 1.1, 0.9, 1.1, 0.02, 5, 1, 0.7, 1],
     lambda t: F.solarize(_reference_blur(F.rgb_to_grayscale(F.hflip(_jitter_code5(t)), 3), 0.7), 128 / 255)),
])
def test_fused_kernel_matches_torchvision(name, params, ref):
    img = np.random.default_rng(0).integers(0, 256, (24, 28, 3), dtype=np.uint8)
    t = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    out = _kernel(img, params)
    assert out.shape == (3, 24, 28) and out.dtype == torch.uint8
    # uint8 out, rounded half up: within half a level of torchvision's float result (plus the float noise of both)
    err = (out.float() - ref(t) * 255).abs()
    assert err.max() <= 0.5 + 1e-3, err.max()


def _jitter_code5(t):
    # code 5 = permutation (0, 3, 2, 1): brightness 1.1, hue 0.02, saturation 1.1, contrast 0.9
    return F.adjust_contrast(F.adjust_saturation(F.adjust_hue(F.adjust_brightness(t, 1.1), 0.02), 1.1), 0.9)


def test_kernel_permutations_are_all_24_orders():
    perms = {tuple(K._permutation(c)) for c in range(24)}
    assert len(perms) == 24 and all(sorted(p) == [0, 1, 2, 3] for p in perms)


# ----------------------------------------------------------------------------------------------------------------
# DALI against the torch path: shapes, dtypes, ranges, crop-scale statistics


def _normalized(batches, spec):
    """Both backends deliver uint8 images; normalized as the trainer does on the device."""
    for b in batches:
        assert all(b[k].dtype == torch.uint8 for k in ("image", "global", "local") if k in b), b.keys()
    return [ImageNormalizer.of(spec)(b) for b in batches]


def _dali_batches(shards, spec, n, **kw):
    loader = DaliLoader(shards, spec, batch_size=kw.pop("batch_size", 32), num_threads=1, shuffle_buffer=64, **kw)
    return _normalized([next(loader) for _ in range(n)], spec)


def _torch_batches(shards, spec, n, batch_size=32):
    torch.manual_seed(0)
    it = iter(build_loader(shards, sample_fn=torch_sample_fn(spec), batch_size=batch_size, num_workers=0,
                           shuffle_buffer=64))
    return _normalized([next(it) for _ in range(n)], spec)


def _extent(images):
    """Per image: (x extent, y extent) of the source region, from the coordinate-coded red/green channels."""
    px = images.numpy() * STD[None] + MEAN[None]  # [N, 3, h, w] back to [0, 1]
    r, g = px[:, 0].reshape(len(px), -1), px[:, 1].reshape(len(px), -1)
    return (np.percentile(r, 99, 1) - np.percentile(r, 1, 1)), (np.percentile(g, 99, 1) - np.percentile(g, 1, 1))


def test_clip_transform_dali_matches_torch(coords):
    spec = ImageTextSpec(32, train=True, crop_scale=(0.3, 1.0))
    dali, ref = _dali_batches(coords, spec, 3), _torch_batches(coords, spec, 3)
    for d, r in zip(dali, ref):
        assert d["image"].shape == r["image"].shape == (32, 3, 32, 32)
        assert d["image"].dtype == r["image"].dtype == torch.float32
        assert d["caption"] == r["caption"] == ["a coordinate image"] * 32
    d_img = torch.cat([b["image"] for b in dali])
    r_img = torch.cat([b["image"] for b in ref])
    lo, hi = float(_norm(torch.zeros(3, 1, 1)).min()), float(_norm(torch.ones(3, 1, 1)).max())
    for img in (d_img, r_img):  # inside the normalized [0, 1] range, up to cubic overshoot
        assert img.min() >= lo - 0.3 and img.max() <= hi + 0.3
    # Crop area (fraction of the image) and aspect: same distributions. Area ~ U(0.3, 1), so mean 0.65, sd 0.2.
    dx, dy = _extent(d_img)
    rx, ry = _extent(r_img)
    d_area, r_area = dx * dy, rx * ry
    assert 0.25 < d_area.min() and d_area.max() <= 1.02 and 0.25 < r_area.min() and r_area.max() <= 1.02
    assert abs(d_area.mean() - r_area.mean()) < 0.08, (d_area.mean(), r_area.mean())
    # width/height of the region in pixels (image is 160 x 120), log-uniform in [3/4, 4/3] before clamping
    d_ratio, r_ratio = np.log(dx * 160 / (dy * 120)), np.log(rx * 160 / (ry * 120))
    assert abs(d_ratio.mean() - r_ratio.mean()) < 0.1 and np.abs(d_ratio).max() < np.log(4 / 3) + 0.1


def test_eval_transform_is_deterministic_center_crop(coords):
    spec = ImageTextSpec(30, train=False)
    d = _dali_batches(coords, spec, 1)[0]["image"]
    r = _torch_batches(coords, spec, 1)[0]["image"]
    # resize the short side (120 -> 30), center crop: the same pixels up to the resampling filters
    torch.testing.assert_close(d[0], r[0], atol=0.08, rtol=0)
    assert torch.equal(d[0], d[1])


def test_dino_multicrop_dali_matches_torch(coords, synth, monkeypatch):
    spec = MultiCropSpec(32, 16, num_global=2, num_local=3, global_scale=(0.4, 1.0), local_scale=(0.05, 0.3),
                         blur_radius=(0.1, 0.5))
    # Geometry: with the color ops switched off (both backends read these constants), crop areas must agree.
    for name in ("JITTER_P", "GRAY_P", "SOLARIZE_P"):
        monkeypatch.setattr(S, name, 0.0)
    dali, ref = _dali_batches(coords, spec, 2), _torch_batches(coords, spec, 2)
    for d, r in zip(dali, ref):
        assert d["global"].shape == r["global"].shape == (32, 2, 3, 32, 32)
        assert d["local"].shape == r["local"].shape == (32, 3, 3, 16, 16)
        assert d["global"].dtype == r["global"].dtype == torch.float32
    for key, (lo, hi) in (("global", (0.4, 1.0)), ("local", (0.05, 0.3))):
        d_img = torch.cat([b[key].flatten(0, 1) for b in dali])
        r_img = torch.cat([b[key].flatten(0, 1) for b in ref])
        (dx, dy), (rx, ry) = _extent(d_img), _extent(r_img)
        assert abs((dx * dy).mean() - (rx * ry).mean()) < 0.06, key
        assert (dx * dy).max() <= hi + 0.1 and (dx * dy).min() >= lo * 0.6, key
    monkeypatch.undo()
    # Color: with the DINO probabilities on, per-crop color statistics agree on natural-ish (synthetic) images.
    dali, ref = _dali_batches(synth, spec, 4), _torch_batches(synth, spec, 4)

    def stats(batches):
        per_crop = []  # per crop: mean, std, grayscale?, min, max (over pixels, before normalization)
        for key in ("global", "local"):
            crops = torch.cat([b[key].flatten(0, 1) for b in batches])
            px = crops * torch.from_numpy(STD).float() + torch.from_numpy(MEAN).float()
            gray = ((px[:, 0] - px[:, 1]).abs().amax((1, 2)) < 1e-3).float()  # grayscale crops: p 0.2
            per_crop.append(torch.stack([px.mean((1, 2, 3)), px.std((1, 2, 3)), gray, px.amin((1, 2, 3)),
                                         px.amax((1, 2, 3))], 1))
        c = torch.cat(per_crop)
        return c[:, 0].mean().item(), c[:, 1].mean().item(), c[:, 2].mean().item(), c[:, 3].min().item(), \
            c[:, 4].max().item()

    d, r = stats(dali), stats(ref)
    assert abs(d[0] - r[0]) < 0.05 and abs(d[1] - r[1]) < 0.05, (d, r)
    assert abs(d[2] - r[2]) < 0.1 and 0.1 < d[2] < 0.35, (d, r)
    assert d[3] >= -1e-4 and d[4] <= 1 + 1e-4  # values stay in [0, 1] before normalization, like torchvision's


def test_gpu_multicrop_graph_run_on_the_cpu_matches_torch(synth):
    """The GPU pipeline's graph (DALI's own color_twist / gaussian_blur / lookup_table under conditionals), run with
    CPU operators: same shapes, and color statistics close to the torch path's (it pivots contrast on mid-gray and
    applies the jitter in one order, so the tolerance is looser than for the fused CPU kernel)."""
    spec = MultiCropSpec(32, 16, num_global=2, num_local=3, blur_radius=(0.1, 0.5))
    files = sorted(expand_shards(synth))
    pipe = build_pipeline(spec, files, [f[:-4] + ".idx" for f in files], batch_size=32, num_threads=1,
                          device="cpu", device_id=None, seed=0, shuffle_buffer=64, fused=False)
    outs = [pipe.run() for _ in range(4)]
    glob = torch.cat([torch.from_numpy(np.asarray(o[0].as_tensor())) for o in outs])
    loc = torch.cat([torch.from_numpy(np.asarray(o[1].as_tensor())) for o in outs])
    assert glob.dtype == loc.dtype == torch.uint8
    glob, loc = ImageNormalizer.of(spec)({"global": glob, "local": loc}).values()
    assert glob.shape == (128, 2, 3, 32, 32) and loc.shape == (128, 3, 3, 16, 16)
    ref = _torch_batches(synth, spec, 4)
    mean, std = torch.from_numpy(MEAN).float(), torch.from_numpy(STD).float()
    for d, r in ((glob, torch.cat([b["global"] for b in ref])), (loc, torch.cat([b["local"] for b in ref]))):
        d, r = d.flatten(0, 1) * std + mean, r.flatten(0, 1) * std + mean
        assert abs(d.mean() - r.mean()) < 0.06 and abs(d.std((1, 2, 3)).mean() - r.std((1, 2, 3)).mean()) < 0.06
        assert d.min() >= -1e-3 and d.max() <= 1 + 1e-3


# ----------------------------------------------------------------------------------------------------------------
# resume, buffers, sharding, epochs


@pytest.mark.parametrize("spec", [ImageTextSpec(32), MultiCropSpec(32, 16, num_local=2)], ids=["clip", "dino"])
def test_resume_is_exact_across_an_epoch_boundary(synth, spec):
    kw = dict(batch_size=24, num_threads=1, shuffle_buffer=50, seed=3, resampled=False)
    a = DaliLoader(synth, spec, **kw)
    for _ in range(8):  # 240 samples: 10 batches per epoch
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # as it travels through a checkpoint
    expected = [next(a) for _ in range(5)]  # crosses into epoch 1
    b = DaliLoader(synth, spec, **kw)
    b.load_state_dict(state)
    got = [next(b) for _ in range(5)]
    key = "image" if isinstance(spec, ImageTextSpec) else "global"
    for e, g in zip(expected, got):
        assert torch.equal(e[key], g[key])
        if "caption" in e:
            assert e["caption"] == g["caption"]
    assert b.epoch == 1


def test_resume_refuses_another_setup(synth):
    a = DaliLoader(synth, ImageTextSpec(32), batch_size=8, num_threads=1)
    next(a)
    b = DaliLoader(synth, ImageTextSpec(32), batch_size=16, num_threads=1)
    with pytest.raises(ValueError, match="cannot be restored"):
        b.load_state_dict(a.state_dict())


def test_cpu_batches_stay_valid_after_later_iterations(synth):
    loader = DaliLoader(synth, ImageTextSpec(32), batch_size=16, num_threads=1)
    held = [next(loader)["image"] for _ in range(3)]
    copies = [h.clone() for h in held]
    for _ in range(8):
        next(loader)
    assert all(torch.equal(h, c) for h, c in zip(held, copies))


def _sources(loader, batches):
    """The samples (shard:offset:name) a loader's reader delivers over `batches` batches of its current epoch."""
    pipe, _ = loader._build(loader.epoch, reader_only=True, prefetch=1)
    out = []
    for _ in range(batches):
        _, _, src = pipe.run()
        out += [bytes(np.asarray(src[j])).rstrip(b"\0").decode() for j in range(len(src))]
    return out


def test_ranks_read_disjoint_parts_and_epochs_cover_the_data(synth):
    kw = dict(batch_size=20, num_threads=1, shuffle_buffer=30, resampled=False, seed=1)
    r0, r1 = (DaliLoader(synth, ImageTextSpec(32), rank=r, world_size=2, **kw) for r in (0, 1))
    _, n0 = r0._epoch_layout(0)
    _, n1 = r1._epoch_layout(0)
    assert n0 == n1 == 6  # 120 samples per rank
    s0, s1 = _sources(r0, 6), _sources(r1, 6)
    assert len(set(s0)) == len(s0) == 120 and len(set(s1)) == 120 and not set(s0) & set(s1)
    names = {s.rsplit(":", 1)[1] for s in s0 + s1}
    assert len(names) == 240  # every sample once per epoch over the two ranks
    assert r0.epoch_files(0) != r0.epoch_files(1)  # a new shard order each epoch, the same on every rank
    assert r0.epoch_files(1) == r1.epoch_files(1)


# ----------------------------------------------------------------------------------------------------------------
# corrupt data


def _corrupt_shard(src_dir, out_path, cases):
    """Copy the first shard of src_dir, replacing samples 0..len(cases)-1 by the corruption named in `cases`."""
    src = sorted(expand_shards(src_dir))[0]
    with tarfile.open(src) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    keys = sorted({n.split(".")[0] for n, _ in members})
    bad = dict(zip(keys, cases))
    with tarfile.open(out_path, "w") as out:
        for name, data in members:
            key, ext = name.split(".", 1)
            case = bad.get(key)
            if case == "truncated" and ext == "jpg":
                data = data[: len(data) // 2]
            elif case == "not-an-image" and ext == "jpg":
                data = b"<html>404 not found</html>"
            elif case == "truncated-with-eoi" and ext == "jpg":
                data = data[: len(data) // 2] + b"\xff\xd9"  # passes the quick (unvalidated) check
            elif case == "no-caption" and ext == "txt":
                continue
            elif case == "not-utf8" and ext == "txt":
                data = b"\xff\xfe caption"
            _add(out, name, data)
    return out_path


def test_index_validation_leaves_out_corrupt_samples_and_captions(synth, tmp_path):
    shard = _corrupt_shard(synth, str(tmp_path / "bad.tar"),
                           ["truncated", "not-an-image", "no-caption", "not-utf8"])
    rep = build_index(shard)
    assert [e["key"] for e in rep.excluded] == ["000000000", "000000001"]
    assert "truncated" in rep.excluded[0]["reason"] and "cannot be decoded" in rep.excluded[1]["reason"]
    assert [(e["key"], e["reason"].split(" (")[0]) for e in rep.no_caption] == [
        ("000000002", "missing caption"), ("000000003", "caption is not UTF-8")]
    assert rep.num_samples == 58 and rep.num_captioned == 56
    clip = DaliLoader(shard, ImageTextSpec(32), batch_size=8, num_threads=1)
    dino = DaliLoader(shard, MultiCropSpec(32, 16, num_local=1), batch_size=8, num_threads=1)
    assert clip.num_excluded == 4 and clip.sizes[shard] == 56  # image-text: the captionless samples too
    assert dino.num_excluded == 2 and dino.sizes[shard] == 58  # image-only: they still have an image
    for loader in (clip, dino):
        for _ in range(7):
            assert int(next(loader)["num_skipped"]) == 0


def test_empty_and_unreadable_shards_are_skipped_with_a_reason(synth, tmp_path, caplog):
    good = sorted(expand_shards(synth))[0]
    empty = tmp_path / "empty.tar"  # a valid tar without samples
    with tarfile.open(empty, "w") as t:
        _add(t, "README", b"no samples here")
    junk = tmp_path / "junk.tar"  # a valid first header, then cut off: an interrupted copy
    junk.write_bytes(open(good, "rb").read()[:1500])
    reports, failed = ensure_indexes([good, str(empty), str(junk)], index_dir=str(tmp_path / "idx"), progress=False)
    assert [r.num_samples for r in reports] == [60, 0, 0]
    assert [s for s, _ in failed] == [str(junk)] and "not a readable tar" in failed[0][1]
    with caplog.at_level(logging.WARNING):
        loader = DaliLoader(f"{good},{empty},{junk}", ImageTextSpec(32), batch_size=10, num_threads=1,
                            index_dir=str(tmp_path / "idx"))
    assert loader.files == [good] and loader.num_empty_shards == 2
    assert "junk.tar (shard" in caplog.text and "not a readable tar" in caplog.text and "empty.tar" in caplog.text
    assert next(loader)["image"].shape == (10, 3, 32, 32)


def test_missing_index_is_a_clear_error(synth, tmp_path):
    shard = tmp_path / "x.tar"
    shard.write_bytes(open(sorted(expand_shards(synth))[0], "rb").read())
    with pytest.raises(FileNotFoundError, match="fastenc data index"):
        DaliLoader(str(shard), ImageTextSpec(32), batch_size=4)
    build_index(str(shard))
    assert read_report(str(shard)) is not None
    os.utime(shard, (1, 1))  # the shard changed after indexing: the index is stale
    with pytest.raises(FileNotFoundError, match="stale"):
        DaliLoader(str(shard), ImageTextSpec(32), batch_size=4)


@pytest.mark.parametrize("case", ["truncated", "not-an-image"])
def test_recovery_from_a_corrupt_sample_the_index_did_not_catch(synth, tmp_path, caplog, case):
    """An index from DALI's own wds2idx (no validation): the bad image reaches the decoder and fails its batch;
    the loader finds the sample (DALI's message does not always name it), leaves it out of its own copy of the
    index and continues from the last delivered batch."""
    import wds2idx

    shard = _corrupt_shard(synth, str(tmp_path / "bad.tar"), [None] * 20 + [case])
    with wds2idx.IndexCreator(shard, str(tmp_path / "bad.idx"), verbose=False) as ic:
        ic.create_index()
    loader = DaliLoader(shard, ImageTextSpec(32), batch_size=10, num_threads=1, shuffle_buffer=1, resampled=False,
                        work_dir=str(tmp_path / "work"))
    with caplog.at_level(logging.WARNING):
        batches = [next(loader) for _ in range(12)]  # two epochs of 6 batches (60 samples)
    assert sum(int(b["num_skipped"]) for b in batches) == 1
    assert loader.num_recoveries == 1 and loader._bad == {shard: {"000000020.jpg"}}
    assert "000000020.jpg" in caplog.text
    assert all(b["image"].shape == (10, 3, 32, 32) for b in batches)
    assert open(tmp_path / "bad.idx").read().count("000000020.jpg") == 1  # the shared index is untouched
