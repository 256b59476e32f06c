"""What an objective needs from the data, independent of the backend that produces it.

An objective describes its samples with one of these specs (`Objective.data_spec`); the torch path
(fastenc.data.transforms) and the DALI path (fastenc.data.dali) each build their pipeline from the same spec, so
the two backends cannot drift apart in crop sizes, scale ranges or probabilities.

Batch keys produced from each spec (both backends):
    ImageTextSpec  "image" [B, 3, S, S] uint8; with captions "caption" list[str] (tokenized per batch by the
                   objective's collate, CaptionCollate)
    MultiCropSpec  "global" [B, G, 3, S, S] and, with local crops, "local" [B, N, 3, s, s] uint8
    ConversationSpec  "image" [B, 3, S, S] uint8 and "conversation" list[str], each sample's .json record as text
                   (encoded and padded per batch by the objective's collate, ConversationCollate.finish); the torch
                   path encodes per sample instead (ConversationSample), which also reads records without an image

Images travel as uint8 (a quarter of float32's bytes through the loader workers' shared memory and the
host-to-device copy) and are normalized where they are used, on the device, by `ImageNormalizer` with the spec's
mean / std: the same arithmetic as torchvision's ToTensor + Normalize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# open_clip's OPENAI_DATASET_MEAN / _STD: the normalization every CLIP-family checkpoint expects.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# torchvision RandomResizedCrop's default aspect-ratio range (width / height), sampled log-uniformly.
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ImageTextSpec:
    """One image per sample (+ its caption): open_clip's transform.

    train: RandomResizedCrop to image_size (bicubic, area in crop_scale, aspect in CROP_RATIO);
    eval: resize the shorter side to image_size (bicubic) + center crop. Then normalize with mean/std.
    """

    image_size: int
    train: bool = True
    crop_scale: tuple = (0.9, 1.0)
    captions: bool = True
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD


@dataclass(frozen=True)
class MultiCropSpec:
    """DINO's DataAugmentationDINO: num_global crops at global_size and num_local crops at local_size.

    Every crop: RandomResizedCrop (bicubic) -> flip p 0.5 -> color jitter (brightness 0.4, contrast 0.4,
    saturation 0.2, hue 0.1) p 0.8 -> grayscale p 0.2 -> Gaussian blur -> normalize. Blur p 1.0 on global crop 1,
    p 0.1 plus solarize p 0.2 on the other global crops, p 0.5 on local crops; blur_radius is the blur's sigma
    range in output pixels.
    """

    global_size: int
    local_size: int
    num_global: int = 2
    num_local: int = 10
    global_scale: tuple = (0.25, 1.0)
    local_scale: tuple = (0.05, 0.25)
    blur_radius: tuple = (0.1, 2.0)
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD

    def __post_init__(self):
        lo, hi = (float(r) for r in self.blur_radius)
        if not 0 <= lo <= hi:
            raise ValueError(f"blur_radius must be [min, max] with 0 <= min <= max, got {list(self.blur_radius)}")
        if self.num_global < 1:
            raise ValueError(f"num_global must be >= 1, got {self.num_global}")


@dataclass(frozen=True)
class ConversationSpec:
    """One image + its conversation record (.json, LLaVA's {"conversations": [...]}): the vision-language stage.

    The image always gets the eval transform (resize the shorter side to image_size, bicubic, + center crop), the
    view the encoder was evaluated with; no augmentation (LLaVA-1.5 feeds its frozen encoder the same way)."""

    image_size: int
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD


# DINO's per-crop probabilities, shared by both backends.
JITTER_P, GRAY_P, FLIP_P = 0.8, 0.2, 0.5
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
BLUR_P_GLOBAL1, BLUR_P_GLOBAL2, BLUR_P_LOCAL, SOLARIZE_P = 1.0, 0.1, 0.5, 0.2


class ImageNormalizer:
    """uint8 image tensors of a batch -> (x / 255 - mean) / std, on the tensor's device, in fp32 then cast to dtype.

    The op order of torchvision's ToTensor + Normalize, so the values equal what a float pipeline would deliver.
    Every uint8 tensor of the batch is an image ([..., 3, H, W], both backends); other entries pass unchanged.
    mean / std tensors are made once per device (no host-to-device copy per step).
    """

    def __init__(self, mean, std):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._consts: dict = {}

    def _on(self, device: torch.device):
        if device not in self._consts:
            self._consts[device] = (torch.tensor(self.mean, device=device).view(3, 1, 1),
                                    torch.tensor(self.std, device=device).view(3, 1, 1))
        return self._consts[device]

    def __call__(self, batch: dict, dtype: torch.dtype = torch.float32) -> dict:
        out = dict(batch)
        for key, x in batch.items():
            if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
                if x.dim() < 3 or x.shape[-3] != 3:
                    raise ValueError(f"batch[{key!r}]: a uint8 image must be [..., 3, H, W], got {tuple(x.shape)}")
                mean, std = self._on(x.device)
                out[key] = x.float().div_(255).sub_(mean).div_(std).to(dtype)
        return out

    @classmethod
    def of(cls, spec) -> "ImageNormalizer":
        return cls(spec.mean, spec.std)
