"""Data at train time: webdataset shards and their indexes, decoding/augmentation, tokenizer, the loaders.

The offline tools that make and check shard sets (synth, ingest, inspect) are fastenc.datatools.

Importing this package needs only torch, numpy and Pillow; webdataset, braceexpand, sentencepiece and
torchvision are imported when a function needs them.
"""

from fastenc.data.collate import CaptionCollate, stack_samples
from fastenc.data.loader import build_loader
from fastenc.data.shards import expand_shards
from fastenc.data.tokenizer import Tokenizer, train_tokenizer
from fastenc.data.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CaptionSample,
    CorruptSample,
    decode_caption,
    decode_image,
    image_transform,
)

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "CaptionCollate",
    "CaptionSample",
    "CorruptSample",
    "Tokenizer",
    "build_loader",
    "decode_caption",
    "decode_image",
    "expand_shards",
    "image_transform",
    "stack_samples",
    "train_tokenizer",
]
