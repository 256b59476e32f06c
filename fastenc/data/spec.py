"""What an objective needs from the data, independent of the backend that produces it.

An objective describes its samples with one of these specs (`Objective.data_spec`); the torch path
(fastenc.data.transforms) and the DALI path (fastenc.data.dali) each build their pipeline from the same spec, so
the two backends cannot drift apart in crop sizes, scale ranges or probabilities.

Batch keys produced from each spec (both backends):
    ImageTextSpec  "image" [B, 3, S, S] float32 normalized; with captions "caption" list[str] (tokenized per batch
                   by the objective's collate, CaptionCollate)
    MultiCropSpec  "global" [B, G, 3, S, S] and, with local crops, "local" [B, N, 3, s, s] float32 normalized
"""

from __future__ import annotations

from dataclasses import dataclass

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


# DINO's per-crop probabilities, shared by both backends.
JITTER_P, GRAY_P, FLIP_P = 0.8, 0.2, 0.5
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
BLUR_P_GLOBAL1, BLUR_P_GLOBAL2, BLUR_P_LOCAL, SOLARIZE_P = 1.0, 0.1, 0.5, 0.2
