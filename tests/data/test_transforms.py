import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from fastenc.data.collate import CaptionCollate, stack_samples
from fastenc.data.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CaptionSample,
    CorruptSample,
    decode_caption,
    decode_image,
    image_transform,
)


def _jpeg(size=(80, 60), seed=0):
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_decode_image_roundtrip_and_modes():
    img = decode_image(_jpeg())
    assert img.mode == "RGB" and img.size == (80, 60)
    for mode in ("L", "P", "RGBA"):
        buf = io.BytesIO()
        Image.new(mode, (8, 8)).save(buf, format="PNG")
        assert decode_image(buf.getvalue()).mode == "RGB"


def test_corrupt_images_raise_with_reason():
    import fastenc.data  # noqa: F401  importing fastenc must not relax Pillow's truncation check

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    jpg = _jpeg()
    with pytest.raises(CorruptSample, match="cannot be decoded.*truncated"):
        decode_image(jpg[: len(jpg) // 2])
    with pytest.raises(CorruptSample, match="cannot be decoded"):
        decode_image(b"this is not an image at all")
    with pytest.raises(CorruptSample, match="empty"):
        decode_image(b"")


def test_decode_caption():
    assert decode_caption("  a red star \n".encode()) == "a red star"
    assert decode_caption("ein Bär über 日本".encode()) == "ein Bär über 日本"
    with pytest.raises(CorruptSample, match="caption is not UTF-8"):
        decode_caption("café".encode("latin-1"))
    with pytest.raises(CorruptSample, match="caption is empty"):
        decode_caption(b" \n\t")


def test_uint8_images_normalized_on_the_device_equal_the_float_pipeline():
    """The training path sends uint8 (torch_sample_fn, both specs) and ImageNormalizer normalizes after the copy:
    bitwise what ToTensor + Normalize give, for the same random crops (same seed)."""
    from fastenc.data.spec import ImageNormalizer, ImageTextSpec, MultiCropSpec
    from fastenc.data.transforms import torch_sample_fn

    sample = {"__key__": "k", "jpg": _jpeg((80, 60)), "txt": b"a caption"}
    for spec, keys in ((ImageTextSpec(32), ("image",)), (ImageTextSpec(32, train=False), ("image",)),
                       (MultiCropSpec(32, 16, num_local=3, blur_radius=(0.1, 0.5)), ("global", "local"))):
        torch.manual_seed(0)
        raw = torch_sample_fn(spec)(sample)
        torch.manual_seed(0)
        if isinstance(spec, ImageTextSpec):
            want = {"image": image_transform(32, train=spec.train, scale=spec.crop_scale)(decode_image(sample["jpg"]))}
        else:
            from fastenc.data.transforms import MultiCropSample, multicrop_transforms

            g, loc = multicrop_transforms(32, 16, num_global=spec.num_global, blur_radius=spec.blur_radius)
            want = MultiCropSample(g, loc, spec.num_local)(sample)
        got = ImageNormalizer.of(spec)(raw)
        for k in keys:
            assert raw[k].dtype == torch.uint8, (spec, k)
            assert torch.equal(got[k], want[k]), (spec, k, (got[k] - want[k]).abs().max())
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        ImageNormalizer.of(ImageTextSpec(32))({"image": torch.zeros(2, 4, 8, 8, dtype=torch.uint8)})


@pytest.mark.parametrize("train", [True, False])
def test_image_transform_shapes_and_normalization(train):
    tf = image_transform(32, train=train)
    x = tf(decode_image(_jpeg((80, 60))))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    low, high = (0 - mean) / std, (1 - mean) / std
    assert (x >= low - 1e-5).all() and (x <= high + 1e-5).all()
    # A constant image maps to exactly (value - mean) / std.
    white = tf(Image.new("RGB", (50, 70), (255, 255, 255)))
    torch.testing.assert_close(white, high.expand(3, 32, 32))


def test_train_transform_is_random_and_eval_is_not():
    img = decode_image(_jpeg((96, 96)))
    train, evaluate = image_transform(32, train=True, scale=(0.3, 1.0)), image_transform(32, train=False)
    assert not torch.equal(train(img), train(img))
    assert torch.equal(evaluate(img), evaluate(img))


class _CharTokenizer:
    """Stand-in tokenizer: one id per byte then EOS 3, so CaptionCollate can be tested without sentencepiece."""

    def __call__(self, texts, pad_to_longest=False, multiple_of=1):
        rows = [list(t.encode())[:7] + [3] for t in texts]
        L = -(-max(map(len, rows)) // multiple_of) * multiple_of if pad_to_longest else 8
        return torch.tensor([r + [0] * (L - len(r)) for r in rows])


def test_caption_sample_and_missing_parts():
    fn = CaptionSample(image_transform(16, train=False))
    out = fn({"__key__": "000000001", "jpg": _jpeg(), "txt": b"a red star"})
    assert out["image"].shape == (3, 16, 16) and out["caption"] == "a red star"
    assert fn({"__key__": "k", "png": _png(), "txt": b"x"})["image"].shape == (3, 16, 16)
    with pytest.raises(CorruptSample, match=r"'000000002'.*no image .*found: \.txt"):
        fn({"__key__": "000000002", "txt": b"a caption"})
    with pytest.raises(CorruptSample, match=r"'000000003'.*missing caption \(\.txt\)"):
        fn({"__key__": "000000003", "jpg": _jpeg()})
    with pytest.raises(CorruptSample, match=r"'000000004'.*not UTF-8"):
        fn({"__key__": "000000004", "jpg": _jpeg(), "txt": b"\xff\xfe"})
    image_only = CaptionSample(image_transform(16, train=False), captions=False)
    assert set(image_only({"jpg": _jpeg()})) == {"image"}
    clone = pickle.loads(pickle.dumps(fn))
    assert torch.equal(clone({"jpg": _jpeg(), "txt": b"abc"})["image"], fn({"jpg": _jpeg(), "txt": b"abc"})["image"])


def test_collate():
    samples = [CaptionSample(image_transform(16, train=False))({"jpg": _jpeg(seed=i), "txt": t})
               for i, t in enumerate([b"ab", b"abcd", b"a"])]
    batch = stack_samples(samples)
    assert batch["image"].shape == (3, 3, 16, 16) and batch["caption"] == ["ab", "abcd", "a"]
    out = CaptionCollate(_CharTokenizer(), pad_to_longest=True, multiple_of=2)(samples)
    assert set(out) == {"image", "text"} and torch.equal(out["image"], batch["image"])
    assert out["text"].tolist() == [[97, 98, 3, 0, 0, 0], [97, 98, 99, 100, 3, 0], [97, 3, 0, 0, 0, 0]]
    assert CaptionCollate(_CharTokenizer(), pad_to_longest=False)(samples)["text"].shape == (3, 8)
    with pytest.raises(ValueError, match="sample 1 has keys"):
        stack_samples([samples[0], {"image": samples[1]["image"]}])
    with pytest.raises(ValueError, match="empty"):
        stack_samples([])


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_multicrop_sample_shapes_ranges_and_seeding():
    from fastenc.data.transforms import MultiCropSample, multicrop_transforms

    globals_, local = multicrop_transforms(32, 16, num_global=2)
    fn = MultiCropSample(globals_, local, num_local=3)
    sample = {"__key__": "k", "jpg": _jpeg(size=(80, 60)), "txt": b"ignored"}
    torch.manual_seed(0)
    out = fn(sample)
    assert set(out) == {"global", "local"}
    assert out["global"].shape == (2, 3, 32, 32) and out["local"].shape == (3, 3, 16, 16)
    assert out["global"].dtype == torch.float32 and out["global"].abs().max() < 4  # normalized range
    assert not torch.equal(out["global"][0], out["global"][1])  # two different random views
    torch.manual_seed(0)
    again = fn(sample)
    assert torch.equal(again["global"], out["global"]) and torch.equal(again["local"], out["local"])
    assert set(MultiCropSample(globals_, local, num_local=0)(sample)) == {"global"}
    with pytest.raises(CorruptSample, match="'bad'.*cannot be decoded"):
        fn({"__key__": "bad", "jpg": b"not a jpeg"})
    clone = pickle.loads(pickle.dumps(fn))
    torch.manual_seed(1)
    a = clone(sample)["local"]
    torch.manual_seed(1)
    assert torch.equal(a, fn(sample)["local"])


def test_dino_blur_and_solarize_probabilities():
    """Global crop 1 always blurs; global crop 2 blurs with p 0.1 and solarizes with p 0.2 (the reference's)."""
    from torchvision import transforms as T

    from fastenc.data.transforms import _GaussianBlur, multicrop_transforms

    globals_, local = multicrop_transforms(32, 16)
    blurs = [[t for t in g.transforms if isinstance(t, _GaussianBlur)][0].p for g in globals_]
    assert blurs == [1.0, 0.1]
    assert [t.p for t in globals_[1].transforms if isinstance(t, T.RandomSolarize)] == [0.2]
    assert not any(isinstance(t, T.RandomSolarize) for t in globals_[0].transforms)
    assert [t.p for t in local.transforms if isinstance(t, _GaussianBlur)] == [0.5]


def test_dino_blur_radius_is_configurable_and_validated():
    """blur_radius reaches every crop's blur (the reference's 0.1-2.0 px by default), and the blur it draws stays
    in range: a radius-0 blur leaves the image as it is, a large one smooths it."""
    from fastenc.data.transforms import _GaussianBlur, multicrop_transforms

    def radii(g, loc):
        return {(t.radius_min, t.radius_max) for c in [*g, loc] for t in c.transforms if isinstance(t, _GaussianBlur)}

    assert radii(*multicrop_transforms(32, 16)) == {(0.1, 2.0)}
    assert radii(*multicrop_transforms(32, 16, blur_radius=[0.03, 0.6])) == {(0.03, 0.6)}
    with pytest.raises(ValueError, match="blur_radius"):
        multicrop_transforms(32, 16, blur_radius=[1.0, 0.5])

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    sharp = np.asarray(_GaussianBlur(1.0, 0.0, 0.0)(img), dtype=np.float32)
    smooth = np.asarray(_GaussianBlur(1.0, 3.0, 3.0)(img), dtype=np.float32)
    assert np.array_equal(sharp, np.asarray(img, dtype=np.float32))
    assert smooth.std() < 0.5 * sharp.std()
