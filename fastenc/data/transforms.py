"""Torch fallback for per-sample work: decode image and caption bytes, augment (tokenizing is per batch: collate.py).

Everything here runs inside DataLoader workers (fastenc.data.loader), never in the training process. A sample
that cannot be used raises `CorruptSample`; the loader skips and counts it instead of stopping the run.
"""

from __future__ import annotations

import io

from PIL import Image, ImageFile

from fastenc.utils.optional import warn_once

from fastenc.data import spec as S
from fastenc.data.spec import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTextSpec, MultiCropSpec

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class CorruptSample(Exception):
    """A sample that cannot be decoded or is incomplete; the message says why (and which key, when known)."""


def decode_image(data: bytes) -> Image.Image:
    """Fully decode encoded image bytes into an RGB PIL image; raise CorruptSample on bad or truncated data."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone flipped Pillow's global switch: truncated JPEGs would then decode as grey-padded images.
        warn_once("pil-load-truncated", "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images will not be "
                  "detected as corrupt. Leave it False when training with fastenc.")
    if not data:
        raise CorruptSample("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # Image.open only reads the header; decoding here is what catches truncation.
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")  # palette transparency goes through RGBA without Pillow's warning
        return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise CorruptSample(f"image is too large to decode safely ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL raises UnidentifiedImageError (an OSError) for non-images, OSError for truncated data.
        raise CorruptSample(f"image cannot be decoded ({type(e).__name__}: {e})") from e


def decode_caption(data: bytes) -> str:
    """Decode caption bytes as strict UTF-8 and strip them; raise CorruptSample if not UTF-8 or empty."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptSample(f"caption is not UTF-8 (byte {e.start}: {e.reason})") from e
    text = text.lstrip("\ufeff").strip()
    if not text:
        raise CorruptSample("caption is empty")
    return text


def locate_image(sample: dict) -> tuple[str, str]:
    """(description of the sample for messages, its image extension); CorruptSample if it has no image."""
    key = sample.get("__key__", "?")
    where = f"sample {key!r}" + (f" in {sample['__url__']}" if "__url__" in sample else "")
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        found = ", ".join("." + k for k in sample if not k.startswith("__")) or "nothing"
        raise CorruptSample(f"{where} has no image (.jpg/.jpeg/.png/.webp); found: {found}")
    return where, ext


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def image_transform(image_size: int, *, train: bool, scale=(0.9, 1.0), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                    normalize: bool = True):
    """open_clip's image transform: PIL image -> normalized FloatTensor[3, image_size, image_size].

    train: RandomResizedCrop(bicubic, `scale` area range); eval: Resize(shortest side, bicubic) + CenterCrop.
    normalize=False: a uint8 tensor instead, normalized later on the device (fastenc.data.spec.ImageNormalizer).
    """
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    if train:
        geometry = [T.RandomResizedCrop(image_size, scale=tuple(scale), ratio=S.CROP_RATIO, interpolation=bicubic,
                                        antialias=True)]
    else:
        geometry = [T.Resize(image_size, interpolation=bicubic, antialias=True), T.CenterCrop(image_size)]
    return T.Compose([*geometry, _to_rgb, *_to_tensor(mean, std, normalize)])


def _to_tensor(mean, std, normalize: bool) -> list:
    """PIL -> normalized float CHW (ToTensor + Normalize), or uint8 CHW for normalization on the device."""
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize(mean, std)] if normalize else [T.PILToTensor()]


class CaptionSample:
    """sample_fn for image-caption shards: raw sample dict -> {"image": image_transform's [3,S,S], "caption": str}.

    Captions are tokenized per batch by fastenc.data.collate.CaptionCollate (one sentencepiece call per batch).
    `captions=False` returns only the image (image-only objectives). Picklable when `image_transform` is.
    """

    def __init__(self, image_transform, captions: bool = True):
        self.image_transform = image_transform
        self.captions = captions

    def __call__(self, sample: dict) -> dict:
        where, ext = locate_image(sample)
        try:
            out = {}
            if self.captions:  # caption first: a missing/bad caption skips the sample before the image decode
                if "txt" not in sample:
                    raise CorruptSample("missing caption (.txt)")
                out["caption"] = decode_caption(sample["txt"])
            out["image"] = self.image_transform(decode_image(sample[ext]))
        except CorruptSample as e:
            raise CorruptSample(f"{where}: {e}") from e
        return out

    def __repr__(self):
        return f"CaptionSample({self.image_transform!r}, captions={self.captions})"


class _GaussianBlur:
    """With probability p, PIL Gaussian blur with a radius drawn uniformly from [radius_min, radius_max] (DINO's)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        import torch
        from PIL import ImageFilter

        # torch's RNG (seeded per loader worker by fastenc.data.loader), not python's `random`.
        if self.p < 1.0 and torch.rand(()).item() >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self):
        return f"GaussianBlur(p={self.p}, radius=[{self.radius_min}, {self.radius_max}])"


def multicrop_transforms(global_size: int, local_size: int, *, num_global: int = 2,
                         global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), blur_radius=(0.1, 2.0),
                         mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, normalize: bool = True):
    """DINO's DataAugmentationDINO as torchvision transforms: (list of per-global-crop transforms, local transform).

    Every crop: RandomResizedCrop (bicubic) -> flip p 0.5 -> color jitter (0.4, 0.4, 0.2, 0.1) p 0.8 -> grayscale
    p 0.2 -> blur -> normalize. Blur p 1.0 on global crop 1; p 0.1 and solarize p 0.2 on global crop 2 (and any
    further global crop); p 0.5 on local crops. Normalization is the same mean/std as the image-text objectives
    (the study keeps the pipeline identical across objectives; DINO's reference uses ImageNet's). blur_radius: the
    blur's radius range in output pixels (the reference's 0.1-2.0 px are for 224 px global / 96 px local crops).
    normalize=False: uint8 crops, normalized later on the device (fastenc.data.spec.ImageNormalizer).
    """
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    flip_and_color_jitter = [
        T.RandomHorizontalFlip(p=S.FLIP_P),
        T.RandomApply([T.ColorJitter(**S.JITTER)], p=S.JITTER_P),
        T.RandomGrayscale(p=S.GRAY_P),
    ]
    normalize = [_to_rgb, *_to_tensor(mean, std, normalize)]

    lo, hi = (float(r) for r in blur_radius)
    if not 0 <= lo <= hi:
        raise ValueError(f"blur_radius must be [min, max] with 0 <= min <= max, got {list(blur_radius)}")

    def blur(p):
        return _GaussianBlur(p, lo, hi)

    def crop(size, scale):
        return T.RandomResizedCrop(size, scale=tuple(scale), ratio=S.CROP_RATIO, interpolation=bicubic,
                                   antialias=True)

    globals_ = [T.Compose([crop(global_size, global_scale), *flip_and_color_jitter, blur(S.BLUR_P_GLOBAL1),
                           *normalize])]
    for _ in range(num_global - 1):
        globals_.append(T.Compose([crop(global_size, global_scale), *flip_and_color_jitter, blur(S.BLUR_P_GLOBAL2),
                                   T.RandomSolarize(threshold=128, p=S.SOLARIZE_P), *normalize]))
    local = T.Compose([crop(local_size, local_scale), *flip_and_color_jitter, blur(S.BLUR_P_LOCAL), *normalize])
    return globals_, local


class MultiCropSample:
    """sample_fn for image-only multi-crop objectives (DINO): raw sample -> {"global": [G,3,S,S], "local": [N,3,s,s]}.

    Captions are ignored (an image-only objective trains on the same shards as CLIP). With N = 0 local crops the
    "local" key is absent. Picklable.
    """

    def __init__(self, global_transforms, local_transform, num_local: int):
        self.global_transforms = list(global_transforms)
        self.local_transform = local_transform
        self.num_local = int(num_local)

    def __call__(self, sample: dict) -> dict:
        import torch

        where, ext = locate_image(sample)
        try:
            img = decode_image(sample[ext])
        except CorruptSample as e:
            raise CorruptSample(f"{where}: {e}") from e
        out = {"global": torch.stack([tf(img) for tf in self.global_transforms])}
        if self.num_local:
            out["local"] = torch.stack([self.local_transform(img) for _ in range(self.num_local)])
        return out

    def __repr__(self):
        return f"MultiCropSample({len(self.global_transforms)} global, {self.num_local} local)"


def torch_sample_fn(spec):
    """The torch path's per-sample callable (run in DataLoader workers) for an ImageTextSpec or MultiCropSpec;
    images come out uint8 (fastenc.data.spec)."""
    if isinstance(spec, ImageTextSpec):
        tf = image_transform(spec.image_size, train=spec.train, scale=tuple(spec.crop_scale), mean=spec.mean,
                             std=spec.std, normalize=False)
        return CaptionSample(tf, captions=spec.captions)
    if isinstance(spec, MultiCropSpec):
        globals_, local = multicrop_transforms(spec.global_size, spec.local_size, num_global=spec.num_global,
                                               global_scale=spec.global_scale, local_scale=spec.local_scale,
                                               blur_radius=spec.blur_radius, mean=spec.mean, std=spec.std,
                                               normalize=False)
        return MultiCropSample(globals_, local, spec.num_local)
    raise TypeError(f"no torch transform for data spec {spec!r}")
