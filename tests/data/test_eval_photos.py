"""The DALI and torch eval transforms agree on real photographs of every aspect ratio.

scikit-image's bundled photographs (and two of them turned to portrait) go through the ingest tool, then through
both backends with ImageTextSpec(224, train=False): resize the shorter side to 224 (bicubic, antialiased), center
crop 224. The torch path (PIL + torchvision, as open_clip / timm) is the reference. Both deliver uint8 CHW; what
remains is resampling noise (two bicubic implementations, two JPEG decoders): a mean of 0.11-0.19 levels and at
most 7 levels on any pixel, measured. A long side or crop offset rounded differently shifts the image by a fraction
of a pixel, which shows as a mean of 1.8-7 levels and up to ~200 levels at sharp edges.
"""

import os
import shutil

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install nvidia-dali-cuda130)")

from fastenc.data.dali import DaliLoader  # noqa: E402
from fastenc.data.loader import build_loader  # noqa: E402
from fastenc.data.spec import ImageTextSpec  # noqa: E402
from fastenc.data.transforms import torch_sample_fn  # noqa: E402
from fastenc.datatools.ingest import ingest  # noqa: E402

# The bundled files as shipped (PNG and JPEG bytes ingested unchanged), W x H: landscape of several ratios, square,
# grayscale, and one smaller than 224 on its short side (upsampled).
BUNDLED = {
    "astronaut.png": (512, 512),
    "chelsea.png": (451, 300),
    "coins.png": (384, 303),  # grayscale
    "rocket.jpg": (640, 427),
    "hubble_deep_field.jpg": (1000, 872),
    "motorcycle_left.png": (741, 500),
    "page.png": (384, 191),  # grayscale, upsampled
}
PORTRAIT = {"chelsea_portrait": skimage.data.chelsea, "rocket_portrait": skimage.data.rocket}  # turned 90 degrees
EXIF_ROTATED = "chelsea_exif6"  # a JPEG whose EXIF orientation (6: rotate 90) both backends must ignore alike
SIZE = 224
MEAN_LEVELS = 0.5  # mean |DALI - torch| per image, in uint8 levels
OFF_LEVELS = 8  # a pixel differing by more than this is not resampling noise ...
OFF_FRACTION = 1e-4  # ... and at most this fraction of an image's values may (measured: none)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Ingested shards of the photographs, captioned with their names; returns (shard dir, {name: (W, H)})."""
    src = tmp_path_factory.mktemp("photos")
    sizes = {}
    for name, size in BUNDLED.items():
        shutil.copy(os.path.join(os.path.dirname(skimage.data.__file__), name), src / name)
        sizes[os.path.splitext(name)[0]] = size
    for name, load in PORTRAIT.items():
        image = Image.fromarray(np.ascontiguousarray(np.rot90(load())))
        image.save(src / f"{name}.png")
        sizes[name] = image.size
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(skimage.data.chelsea()).save(src / f"{EXIF_ROTATED}.jpg", quality=95, exif=exif)
    sizes[EXIF_ROTATED] = (451, 300)
    for name in sizes:
        (src / f"{name}.txt").write_text(name)
    out = tmp_path_factory.mktemp("photo_shards")
    ingest(str(src), str(out), captions_from="sidecar", shuffle=False, progress=False)
    return str(out), sizes


def _by_caption(batch) -> dict:
    return dict(zip(batch["caption"], batch["image"]))


def test_eval_transforms_agree_on_photographs(photos):
    shards, sizes = photos
    spec = ImageTextSpec(SIZE, train=False)
    n = len(sizes)
    dali = _by_caption(next(DaliLoader(shards, spec, batch_size=n, device="cpu", num_threads=1, shuffle_buffer=1,
                                       resampled=False)))
    ref = _by_caption(next(iter(build_loader(shards, sample_fn=torch_sample_fn(spec), batch_size=n, num_workers=0,
                                             shuffle_buffer=1))))
    assert sorted(dali) == sorted(ref) == sorted(sizes)
    report, bad = [], []
    for name, (w, h) in sorted(sizes.items()):
        d, r = dali[name], ref[name]
        assert d.dtype == r.dtype == torch.uint8 and d.shape == r.shape == (3, SIZE, SIZE), name
        diff = (d.int() - r.int()).abs().float()
        mean, off = diff.mean().item(), (diff > OFF_LEVELS).float().mean().item()
        report.append(f"{name} {w}x{h}: mean {mean:.2f}, max {diff.max().item():.0f}, >{OFF_LEVELS}: {off:.2%}")
        if mean >= MEAN_LEVELS or off > OFF_FRACTION:
            bad.append(name)
    assert not bad, f"DALI and torch eval transforms disagree on {bad}:\n" + "\n".join(report)
