"""NVIDIA DALI data path: webdataset shards -> decode + augment in DALI -> batch dicts of torch tensors.

One pipeline definition per data spec (fastenc.data.spec) serves both devices:
    device "gpu"   decoders run "mixed" (nvJPEG on the GPU), every augmentation runs on the GPU, batches arrive
                   as CUDA tensors on this rank's device;
    device "cpu"   DALI's CPU backend (device_id=None), for machines without a GPU; batches are CPU tensors.
"auto" picks gpu when torch sees CUDA, else cpu.

What each spec reads and produces (before the loader's `finish`, the objective's collate):
    ImageTextSpec     image (+ .txt): "image" [B, 3, S, S] uint8, train or eval transform; with captions "caption"
                      list[str]
    MultiCropSpec     image: "global" [B, G, 3, S, S] and, with local crops, "local" [B, N, 3, s, s] uint8
    ConversationSpec  image + .json: "image" [B, 3, S, S] uint8, the eval transform (as ImageTextSpec(train=False)),
                      and "conversation" list[str], each sample's .json as text ("" for one that is not UTF-8, which
                      ConversationCollate.finish then skips and counts, as the torch path skips it)
Samples without the spec's text member (.txt, .json) are not read, and not counted in the epoch.

Reading. fn.readers.webdataset reads the shards through their DALI index files (fastenc.data.index; built and
validated by `fastenc data index`, `fastenc data ingest` or, when missing, by the trainer's prepare step). Each epoch
is a list of shards: a seeded permutation (data.resampled=false) or a seeded draw with replacement of as many
shards (data.resampled=true), the same list on every rank; the reader splits the samples of that list into
world_size contiguous parts (shard_id=rank) and shuffles within a buffer of data.shuffle_buffer samples. An epoch
gives every rank the same number of full batches (the smallest rank part // batch size); the rest is dropped.

Resume is exact. `state_dict()` holds the epoch, the batches delivered in it and DALI's own pipeline checkpoint
(reader position and every random generator); a pipeline restored from it produces the batches the old one would
have produced next. A restored run therefore neither repeats nor skips a sample (tests/data/test_dali.py checks it).

Corrupt samples. DALI cannot skip a sample it fails to decode: the whole batch fails and the pipeline object is
dead. fastenc handles it in two layers:
  1. validation when indexing: samples whose image does not decode are left out of the index (counted in the
     index reports and in `num_excluded`), non-UTF-8 or missing captions are left out of image-text epochs (the
     .json of conversations is not validated: the collate skips a bad one and counts it in num_skipped);
  2. a recovery path for whatever still fails (indexes built without validation, or an image Pillow decodes and
     DALI does not): the loader replays the failing batches' raw bytes with a reader-only pipeline, finds the
     samples Pillow cannot decode (all samples of those batches if it finds none), writes this rank's copy of
     the affected indexes without them, and rebuilds the pipeline from the checkpoint of the last delivered batch.
     The skipped samples are counted in the next batch's num_skipped. Because the reader position counts samples
     of the now shorter list, a recovery can repeat or skip up to data.shuffle_buffer + batch_size samples of
     this rank's epoch (measured in tests/data/test_dali.py); after max_recoveries recoveries the loader stops
     and asks for `fastenc data index` (validation), since then the data, not luck, is the problem.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import tempfile

import numpy as np
import torch

from fastenc.data import spec as S
from fastenc.data.index import index_path_for, read_report, report_path_for
from fastenc.data.spec import ConversationSpec, ImageTextSpec, MultiCropSpec
from fastenc.data.transforms import IMAGE_EXTENSIONS, CorruptSample, decode_image
from fastenc.utils import atomic
from fastenc.utils.optional import require

log = logging.getLogger(__name__)

IMAGE_EXT = ";".join(IMAGE_EXTENSIONS)  # fn.readers.webdataset: the first extension present is the image
READER = "reader"
_NUM_LOGGED = 10


def resolve_device(device: str) -> str:
    """'auto' -> 'gpu' if torch sees CUDA else 'cpu'; 'gpu' without CUDA is an error that says what to do."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"DALI device must be auto, cpu or gpu, got {device!r}")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("data.dali_device=gpu but torch sees no CUDA device: use data.dali_device=cpu (or auto)")
    return device


# ----------------------------------------------------------------------------------------------------------------
# Pipeline graphs (called inside a DALI pipeline definition)


def _fn():
    require("nvidia.dali", "the DALI data backend")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    return fn, types


def _to_chw(img, *, mirror=None):
    """HWC uint8 -> CHW uint8 (normalized later on the device, fastenc.data.spec), with the optional flip."""
    import nvidia.dali.fn as fn  # plain imports: also called under DALI's conditional (autograph) conversion
    import nvidia.dali.types as types

    kwargs = dict(dtype=types.UINT8, output_layout="CHW")
    if mirror is not None:
        kwargs["mirror"] = mirror
    return fn.crop_mirror_normalize(img, **kwargs)


def image_text_graph(encoded, spec: ImageTextSpec, device: str):
    """Encoded image bytes -> uint8 [3, S, S]: open_clip's train or eval transform (normalized on the device).

    Every decoder here keeps the pixels as stored (adjust_orientation=False), as PIL does on the torch path (and in
    open_clip): DALI would otherwise rotate JPEGs by their EXIF orientation and the backends would see different
    images."""
    fn, types = _fn()
    decoder = "mixed" if device == "gpu" else "cpu"
    size = spec.image_size
    if spec.train:
        # Decoding only the random crop's region (ROI decode) is what makes DALI's CLIP transform cheap.
        img = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                            random_area=list(spec.crop_scale), random_aspect_ratio=list(S.CROP_RATIO),
                                            num_attempts=10, adjust_orientation=False)
        img = fn.resize(img, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
        return _to_chw(img)
    return eval_image_graph(encoded, size, device)


def eval_image_graph(encoded, size: int, device: str):
    """Encoded image bytes -> uint8 [3, size, size]: the eval transform (of ImageTextSpec(train=False) and of
    ConversationSpec): resize the shorter side to `size` (bicubic) + center crop, as torchvision does."""
    fn, types = _fn()
    img = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                            adjust_orientation=False)
    return _to_chw(_eval_resize_crop(img, size))


def _eval_resize_crop(img, size: int):
    """HWC image -> HWC [size, size]: torchvision's Resize(size) + CenterCrop(size), pixel for pixel.

    Not DALI's resize_shorter + a centered crop: that keeps the exact aspect (a 451 x 300 image scales to 336.75 x
    224 output pixels, rounded to 337, at scale 224/300 on both axes) and rounds the crop offset half up. torchvision
    truncates the long side (int(224 * 451 / 300) = 336: that axis scales by 336/451) and places the crop at
    int(round((new - size) / 2)), Python's round half to even. Off by a fraction of a pixel, sharp edges differ by
    up to ~140 levels. Sizes come from the decoded image's run-time shape (host-side, both devices).
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    shape = img.shape()
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    # int(size * long / short) for the long side and size for the short one, in exact integer arithmetic.
    new_h, new_w = (size * h) // short, (size * w) // short
    img = fn.resize(img, resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT),
                    interp_type=types.INTERP_CUBIC, antialias=True)
    start = fn.cast(fn.stack(_center_offset(new_h - size), _center_offset(new_w - size)),
                    dtype=types.INT32)
    return fn.slice(img, start=start, shape=[size, size], axis_names="HW")


def _center_offset(d):
    """round(d / 2) for a non-negative integer DataNode d, ties to even as Python does: 56.5 -> 56, 57.5 -> 58."""
    half = d // 2
    return half + (d % 2) * (half % 2)


_SOLARIZE_LUT = [k if k < 128 else 255 - k for k in range(256)]  # torchvision's RandomSolarize(threshold=128)


def _dino_crop(img, size: int, scale, blur_p: float, solarize_p: float, spec: MultiCropSpec):
    """One DINO crop: random resized crop, color jitter p 0.8, grayscale p 0.2, blur p, solarize p, flip -> uint8 CHW.

    Probabilistic steps are DALI conditionals, so only the samples that take a step pay for it. Jitter and
    grayscale are one color_twist (grayscale = saturation 0, luma weights 0.299/0.587/0.114, as torchvision), whose
    contrast pivots on mid-gray rather than on the image's mean gray (torchvision), and whose four factors apply in
    one fixed order (torchvision draws a random order). The flip is the mirror of the final crop_mirror_normalize:
    it commutes with the per-pixel color ops and the symmetric blur.
    """
    import nvidia.dali.fn as fn  # plain imports: this runs under DALI's conditional (autograph) conversion
    import nvidia.dali.types as types

    img = fn.random_resized_crop(img, size=[size, size], random_area=list(scale),
                                 random_aspect_ratio=list(S.CROP_RATIO), interp_type=types.INTERP_CUBIC,
                                 antialias=True)
    jitter = fn.random.coin_flip(probability=S.JITTER_P)
    gray = fn.random.coin_flip(probability=S.GRAY_P)
    j, on = S.JITTER, fn.cast(jitter, dtype=types.FLOAT)
    # Drawn for every sample (cheap), applied only to those that jitter or turn gray.
    brightness = 1.0 + on * (fn.random.uniform(range=[1.0 - j["brightness"], 1.0 + j["brightness"]]) - 1.0)
    contrast = 1.0 + on * (fn.random.uniform(range=[1.0 - j["contrast"], 1.0 + j["contrast"]]) - 1.0)
    saturation = 1.0 + on * (fn.random.uniform(range=[1.0 - j["saturation"], 1.0 + j["saturation"]]) - 1.0)
    saturation = saturation * (1.0 - fn.cast(gray, dtype=types.FLOAT))
    hue = on * fn.random.uniform(range=[-360.0 * j["hue"], 360.0 * j["hue"]])  # torchvision's hue is in turns
    if fn.cast(jitter | gray, dtype=types.BOOL):
        img = fn.color_twist(img, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
    lo, hi = (float(r) for r in spec.blur_radius)
    if hi > 0 and blur_p >= 1:
        img = fn.gaussian_blur(img, sigma=fn.random.uniform(range=[max(lo, 1e-3), hi]))
    elif hi > 0 and blur_p > 0:
        if fn.random.coin_flip(probability=blur_p):
            img = fn.gaussian_blur(img, sigma=fn.random.uniform(range=[max(lo, 1e-3), hi]))
    if solarize_p > 0:
        if fn.random.coin_flip(probability=solarize_p):
            img = fn.lookup_table(img, keys=list(range(256)), values=_SOLARIZE_LUT, dtype=types.UINT8)
    return _to_chw(img, mirror=fn.random.coin_flip(probability=S.FLIP_P))


def _cpu_crop_params(num: int, blur_p: float, solarize_p: float, spec: MultiCropSpec):
    """[num, NUM_PARAMS] float per sample: the random draws of `num` crops of one kind (fastenc.data.dali_numba)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    def coin(p):
        return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT) if p > 0 else 0.0 * fn.random.uniform()

    j = S.JITTER
    lo, hi = (float(r) for r in spec.blur_radius)
    rows = []
    for _ in range(num):
        sigma = (fn.random.uniform(range=[max(lo, 1e-3), hi]) * coin(blur_p)) if hi > 0 and blur_p > 0 else coin(0.0)
        draws = [coin(S.FLIP_P), coin(S.JITTER_P),
                 fn.random.uniform(range=[1 - j["brightness"], 1 + j["brightness"]]),
                 fn.random.uniform(range=[1 - j["contrast"], 1 + j["contrast"]]),
                 fn.random.uniform(range=[1 - j["saturation"], 1 + j["saturation"]]),
                 fn.random.uniform(range=[-j["hue"], j["hue"]]),
                 fn.random.uniform(values=[float(k) for k in range(24)]),  # torchvision's randperm(4)
                 coin(S.GRAY_P), sigma, coin(solarize_p)]
        rows.append(fn.stack(*draws))
    return fn.stack(*rows)


def _cpu_crops(img, num: int, size: int, scale, blur_p: float, solarize_p: float, spec: MultiCropSpec):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    from fastenc.data.dali_numba import dali_op

    crops = [fn.random_resized_crop(img, size=[size, size], random_area=list(scale),
                                    random_aspect_ratio=list(S.CROP_RATIO), interp_type=types.INTERP_CUBIC,
                                    antialias=True) for _ in range(num)]
    stacked = fn.stack(*crops) if num > 1 else fn.expand_dims(crops[0], axes=[0])
    return dali_op()(stacked, _cpu_crop_params(num, blur_p, solarize_p, spec))


def multicrop_graph(encoded, spec: MultiCropSpec, device: str, fused: bool | None = None):
    """Encoded bytes -> (global [G, 3, S, S], local [N, 3, s, s] or None): one decode, G + N crops.

    gpu: DALI's GPU operators per crop (_dino_crop). cpu: DALI decodes and crops, then one fused numba kernel per
    crop group does the color, blur, solarize, flip and the uint8 CHW output (fastenc.data.dali_numba), because
    DALI's CPU color and blur operators are too slow to beat PIL. fused=False on cpu runs the gpu graph's operators
    on the CPU (how tests check the GPU graph on machines without a GPU).
    """
    fn, types = _fn()
    img = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                            adjust_orientation=False)
    if device == "cpu" if fused is None else fused:
        # Global crop 1: blur p 1.0, no solarize; the others: blur p 0.1, solarize p 0.2 (DINO's recipe).
        out_global = _cpu_crops(img, 1, spec.global_size, spec.global_scale, S.BLUR_P_GLOBAL1, 0.0, spec)
        if spec.num_global > 1:
            rest = _cpu_crops(img, spec.num_global - 1, spec.global_size, spec.global_scale, S.BLUR_P_GLOBAL2,
                              S.SOLARIZE_P, spec)
            out_global = fn.cat(out_global, rest)
        out_local = (_cpu_crops(img, spec.num_local, spec.local_size, spec.local_scale, S.BLUR_P_LOCAL, 0.0, spec)
                     if spec.num_local else None)
        return out_global, out_local
    globals_ = [_dino_crop(img, spec.global_size, spec.global_scale,
                           S.BLUR_P_GLOBAL1 if i == 0 else S.BLUR_P_GLOBAL2, 0.0 if i == 0 else S.SOLARIZE_P, spec)
                for i in range(spec.num_global)]
    out_global = fn.stack(*globals_) if len(globals_) > 1 else fn.expand_dims(globals_[0], axes=[0])
    if not spec.num_local:
        return out_global, None
    locals_ = [_dino_crop(img, spec.local_size, spec.local_scale, S.BLUR_P_LOCAL, 0.0, spec)
               for _ in range(spec.num_local)]
    out_local = fn.stack(*locals_) if len(locals_) > 1 else fn.expand_dims(locals_[0], axes=[0])
    return out_global, out_local


def output_names(spec) -> list[str]:
    if isinstance(spec, ImageTextSpec):
        return ["image"] + (["caption", "caption_len"] if spec.captions else [])
    if isinstance(spec, MultiCropSpec):
        return ["global"] + (["local"] if spec.num_local else [])
    if isinstance(spec, ConversationSpec):
        return ["image", "conversation", "conversation_len"]
    raise TypeError(f"no DALI pipeline for data spec {spec!r}")


def text_ext(spec) -> str | None:
    """The text member a sample needs for `spec`: "txt" (captions), "json" (conversations) or None (image only)."""
    if isinstance(spec, ConversationSpec):
        return "json"
    return "txt" if isinstance(spec, ImageTextSpec) and spec.captions else None


def build_pipeline(spec, files: list[str], indexes: list[str], *, batch_size: int, num_threads: int, device: str,
                   device_id: int | None, seed: int, shard_id: int = 0, num_shards: int = 1,
                   shuffle_buffer: int = 1000, checkpoint: bytes | None = None, prefetch: int = 2,
                   reader_only: bool = False, fused: bool | None = None):
    """A built DALI pipeline over `files` (with their index files) producing output_names(spec), in order.

    reader_only: no decoding, outputs the raw image bytes (padded) and each sample's source ("shard:offset:name");
    with the same seed and sharding it reads exactly the samples the full pipeline reads (used to attribute a
    decode failure). checkpoint: restore a state from Pipeline.checkpoint() of the same full pipeline.
    """
    require("nvidia.dali", "the DALI data backend")
    from nvidia.dali import pipeline_def

    fn, types = _fn()
    text = text_ext(spec)
    exts = [IMAGE_EXT, text] if text else [IMAGE_EXT]

    fused = device == "cpu" if fused is None else fused
    conditionals = isinstance(spec, MultiCropSpec) and not fused and not reader_only
    if isinstance(spec, MultiCropSpec) and fused and not reader_only:
        from fastenc.data.dali_numba import dali_op

        dali_op()  # compile the numba kernel before defining the graph (once per process)

    @pipeline_def(enable_checkpointing=True, enable_conditionals=conditionals)
    def graph():
        read = fn.readers.webdataset(paths=files, index_paths=indexes, ext=exts, missing_component_behavior="skip",
                                     random_shuffle=shuffle_buffer > 1, initial_fill=max(int(shuffle_buffer), 1),
                                     seed=seed, shard_id=shard_id, num_shards=num_shards, pad_last_batch=False,
                                     name=READER)
        encoded = read[0] if text else read
        if reader_only:
            return fn.pad(encoded), encoded.shape(), fn.pad(fn.get_property(encoded, key="source_info"))
        if isinstance(spec, (ImageTextSpec, ConversationSpec)):
            image = (eval_image_graph(encoded, spec.image_size, device) if isinstance(spec, ConversationSpec)
                     else image_text_graph(encoded, spec, device))
            if not text:
                return image
            return image, fn.pad(read[1]), read[1].shape()
        glob, loc = multicrop_graph(encoded, spec, device, fused)
        return (glob, loc) if loc is not None else glob

    pipe = graph(batch_size=batch_size, num_threads=max(1, int(num_threads)),
                 device_id=device_id if device == "gpu" else None, seed=seed, prefetch_queue_depth=prefetch,
                 checkpoint=checkpoint, exec_dynamic=True)
    pipe.build()
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Output conversion


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList -> a torch tensor on `device`.

    CPU: zero-copy. The pipelines run on DALI's dynamic executor (exec_dynamic=True), which allocates every
    iteration's outputs anew and keeps them alive while referenced, so the tensor stays valid after later runs
    (tests/data/test_dali.py holds batches across iterations to check it). GPU: copied into a torch CUDA tensor
    on the current stream (DALI's feed_ndarray).
    """
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    tensor = tl.as_tensor()
    if device.type == "cpu" and not tl.__class__.__name__.endswith("GPU"):
        return torch.from_numpy(np.asarray(tensor))
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return out


def _rows(padded: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """A batch of padded byte rows (fn.pad) and their lengths -> each row's bytes."""
    buf = padded.tobytes()
    width = padded.shape[1] if padded.ndim == 2 else 0
    return [buf[i * width: i * width + n] for i, n in enumerate(lengths.reshape(-1).tolist())]


def _conversations(padded: np.ndarray, lengths: np.ndarray) -> tuple[list[str], int]:
    """Rows of padded .json bytes -> their text; (texts, number not UTF-8). A row that is not UTF-8 becomes "", which
    the collate's parse rejects (a counted skip), as the torch path rejects its bytes: no record is trained on
    with replacement characters."""
    out, bad = [], 0
    for raw in _rows(padded, lengths):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append("")
            bad += 1
    return out, bad


def _captions(padded: np.ndarray, lengths: np.ndarray) -> tuple[list[str], int]:
    """Rows of padded caption bytes -> stripped strings; (captions, number repaired: not UTF-8 or empty)."""
    out, repaired = [], 0
    for raw in _rows(padded, lengths):
        try:
            text = raw.decode("utf-8").lstrip("\ufeff").strip()
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace").strip()
            repaired += 1
        if not text:
            repaired += 1
        out.append(text)
    return out, repaired


# ----------------------------------------------------------------------------------------------------------------
# The loader


class DaliLoader:
    """Infinite iterator of batch dicts {output keys..., "num_skipped"} over webdataset shards, through DALI.

    Same contract as fastenc.data.loader.build_loader (the torch path): `finish(batch)` plays the role of the
    collate (e.g. tokenizing captions, CaptionCollate.finish), and each batch carries num_skipped (samples skipped
    since the previous batch). Adds exact resume (state_dict / load_state_dict) and `num_excluded`: the samples of
    this run's shards that the index validation found unusable for this spec (bad image; with captions, also a
    missing or non-UTF-8 caption; with conversations, also a missing .json), left out of every epoch.
    """

    backend = "dali"

    def __init__(self, shards, spec, *, batch_size: int, num_threads: int = 2, device: str = "auto",
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 resampled: bool = True, index_dir: str | None = None, finish=None, work_dir: str | None = None,
                 max_recoveries: int = 100, prefetch: int = 2, torch_device=None):
        from fastenc.data.shards import expand_shards

        require("nvidia.dali", "data.backend=dali")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.spec, self.batch_size, self.num_threads = spec, int(batch_size), int(num_threads)
        self.device = resolve_device(device)
        if self.device == "gpu":  # batches arrive on this CUDA device; a CPU pipeline's stay on the host
            torch_device = torch.device(torch_device) if torch_device is not None else torch.device(
                "cuda", torch.cuda.current_device())
            if torch_device.type != "cuda":
                raise ValueError(f"DALI device gpu delivers CUDA tensors, but torch_device is {torch_device}")
        self.torch_device = torch_device if self.device == "gpu" else torch.device("cpu")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle_buffer, self.resampled, self.prefetch = int(shuffle_buffer), bool(resampled), int(prefetch)
        self.finish = finish
        self.max_recoveries = int(max_recoveries)
        self.names = output_names(spec)
        self.captions = "caption" in self.names
        self.text_ext = text_ext(spec)

        urls = expand_shards(shards)
        self.files, self.indexes, self.sizes = [], {}, {}
        self.num_excluded = self.num_no_caption = 0
        missing, empty = [], []
        for url in urls:
            ip = index_path_for(url, index_dir)
            rep = read_report(url, ip)
            if rep is None:
                if not os.path.isfile(ip) or os.path.isfile(report_path_for(ip)):  # none, or fastenc's but stale
                    missing.append(url)
                    continue
                n = _count_index(ip, ext=self.text_ext)  # an index from another tool (wds2idx): unvalidated
            else:
                # .json is not validated by the indexer, so its count is not in the report: the index lines tell.
                n = (rep.num_samples if self.text_ext is None else rep.num_captioned if self.text_ext == "txt"
                     else _count_index(ip, ext=self.text_ext))
                self.num_no_caption += len(rep.no_caption) if self.captions else 0
                self.num_excluded += len(rep.excluded) + rep.num_samples - n  # bad image, or no text member
            if n == 0:
                empty.append(f"{url} ({rep.error})" if rep is not None and rep.error else url)
                continue
            self.files.append(url)
            self.indexes[url], self.sizes[url] = ip, n
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(
                f"{len(missing)} shard(s) have no DALI index or a stale one: {shown}. Build them with `fastenc data "
                f"index {os.path.dirname(missing[0]) or '.'}`" + (f" --index-dir {index_dir}" if index_dir else "")
                + " (the trainer does this itself before training with data.backend=dali).")
        if empty:
            log.warning("skipping %d shard(s) with no usable samples (empty or unreadable): %s", len(empty),
                        ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
        if not self.files:
            raise ValueError(f"no usable samples in {len(urls)} shard(s) of {shards!r}"
                             + (" (none has a caption)" if self.captions else f" (none has a .{self.text_ext})"
                                if self.text_ext else ""))
        self.num_empty_shards = len(empty)
        # Per-rank copies of indexes rewritten by a recovery (never the shared ones).
        self._work_dir = work_dir
        self._overrides: dict[str, str] = {}
        self._bad: dict[str, set] = {}
        self.num_recoveries = 0
        self._pending_skipped = 0
        self._repaired_logged = 0
        self.epoch, self.batch_in_epoch = 0, 0
        self._checkpoint: bytes | None = None
        self._pipe = None
        self._batches_per_epoch = 0

    # ----- epochs -----
    def signature(self) -> str:
        """What must match for a saved position to apply: shards, spec, batch size, sharding, seed, shuffling."""
        blob = json.dumps([self.files, repr(self.spec), self.batch_size, self.world_size, self.rank, self.seed,
                           self.shuffle_buffer, self.resampled], default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def epoch_files(self, epoch: int) -> list[str]:
        """The epoch's shard list, identical on every rank: a permutation, or a draw with replacement."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.resampled:
            return [rng.choice(self.files) for _ in self.files]
        files = list(self.files)
        rng.shuffle(files)
        return files

    def _index_of(self, url: str) -> str:
        return self._overrides.get(url, self.indexes[url])

    def _epoch_layout(self, epoch: int):
        files = self.epoch_files(epoch)
        total = sum(self._size(f) for f in files)
        parts = [total * (i + 1) // self.world_size - total * i // self.world_size for i in range(self.world_size)]
        return files, min(parts) // self.batch_size

    def _size(self, url: str) -> int:
        return self.sizes[url] - len(self._bad.get(url, ()))

    def _pipe_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch * 7919 + self.rank) & 0x7FFFFFFF

    def _build(self, epoch: int, checkpoint: bytes | None = None, reader_only: bool = False, prefetch=None):
        files, batches = self._epoch_layout(epoch)
        if batches == 0 and not reader_only:
            raise ValueError(f"an epoch of {sum(self._size(f) for f in files)} samples over {self.world_size} rank(s) "
                             f"holds no full batch of {self.batch_size}: use more shards or a smaller batch")
        device_id = self.torch_device.index if self.device == "gpu" else None
        pipe = build_pipeline(self.spec, files, [self._index_of(f) for f in files], batch_size=self.batch_size,
                              num_threads=self.num_threads, device=self.device, device_id=device_id,
                              seed=self._pipe_seed(epoch), shard_id=self.rank, num_shards=self.world_size,
                              shuffle_buffer=self.shuffle_buffer, checkpoint=checkpoint,
                              prefetch=self.prefetch if prefetch is None else prefetch, reader_only=reader_only)
        return pipe, batches

    def _start_epoch(self, epoch: int, checkpoint: bytes | None = None, batch_in_epoch: int = 0):
        self._pipe = None
        self._pipe, self._batches_per_epoch = self._build(epoch, checkpoint)
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._checkpoint = checkpoint if checkpoint is not None else self._pipe.checkpoint()

    # ----- iteration -----
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._pipe is None:
            self._start_epoch(self.epoch, self._checkpoint, self.batch_in_epoch)
        if self.batch_in_epoch >= self._batches_per_epoch:
            self._start_epoch(self.epoch + 1)
        try:
            outs = self._pipe.run()
        except RuntimeError as e:
            if not _is_decode_error(e):
                raise
            self._recover(e)
            return next(self)
        self.batch_in_epoch += 1
        self._checkpoint = self._pipe.checkpoint()
        batch = self._convert(outs)
        batch["num_skipped"] = torch.tensor(self._pending_skipped, dtype=torch.int64)
        self._pending_skipped = 0
        return self.finish(batch) if self.finish is not None else batch

    def _convert(self, outs) -> dict:
        batch = {}
        named = dict(zip(self.names, outs))
        for name in ("image", "global", "local"):
            if name in named:
                batch[name] = _to_torch(named[name], self.torch_device)
        if self.captions:
            padded = np.asarray(named["caption"].as_tensor())
            lengths = np.asarray(named["caption_len"].as_tensor())
            batch["caption"], repaired = _captions(padded, lengths)
            if repaired:
                self._repaired_logged += repaired
                if self._repaired_logged <= _NUM_LOGGED:
                    log.warning("%d caption(s) in this batch were not UTF-8 or empty and were decoded with "
                                "replacement characters; index the shards with `fastenc data index` (validation "
                                "leaves such captions out)", repaired)
        if "conversation" in named:
            batch["conversation"], bad = _conversations(np.asarray(named["conversation"].as_tensor()),
                                                        np.asarray(named["conversation_len"].as_tensor()))
            if bad:
                self._repaired_logged += bad
                if self._repaired_logged <= _NUM_LOGGED:
                    log.warning("%d conversation record(s) (.json) in this batch are not UTF-8; they reach the "
                                "collate as empty text, which skips and counts them", bad)
        return batch

    # ----- resume -----
    def state_dict(self) -> dict:
        """Position after the last delivered batch (JSON-serializable)."""
        return {"backend": "dali", "signature": self.signature(), "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "checkpoint": base64.b64encode(self._checkpoint).decode() if self._checkpoint else None,
                "bad": {k: sorted(v) for k, v in self._bad.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batch the state was saved at (a mismatching state is refused, loudly)."""
        if not state or state.get("backend") != "dali":
            raise ValueError("not a DALI loader state")
        if state.get("signature") != self.signature():
            raise ValueError("the saved data position belongs to other shards, spec, batch size, world size, rank or "
                             "seed; it cannot be restored")
        for url, names in state.get("bad", {}).items():
            if url in self.indexes:
                self._bad[url] = set(names)
                self._write_override(url)
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        cp = state.get("checkpoint")
        self._checkpoint = base64.b64decode(cp) if cp else None
        self._pipe = None

    # ----- recovery -----
    def _recover(self, error: RuntimeError) -> None:
        """A batch failed to decode: find the culprits, leave them out of this rank's indexes, rebuild."""
        self._pipe = None
        self.num_recoveries += 1
        if self.num_recoveries > self.max_recoveries:
            raise RuntimeError(
                f"DALI failed to decode {self.num_recoveries} batches in this run; the shards hold more corrupt "
                f"images than a recovery path should absorb. Validate them: `fastenc data index --force DIR` "
                f"(left-out samples are listed in the .idx.json reports). Last error: {_first_line(error)}") from error
        bad = self._find_bad_samples()
        if not bad:
            raise RuntimeError(f"DALI failed on a batch but no sample of it could be attributed: {error}") from error
        for url, names in bad.items():
            self._bad.setdefault(url, set()).update(names)
            self._write_override(url)
        count = sum(len(v) for v in bad.values())
        self._pending_skipped += count
        listed = "; ".join(f"{u}: {', '.join(sorted(n)[:3])}" for u, n in bad.items())
        log.warning("DALI could not decode a batch (%s); skipping %d sample(s) (%s) and rebuilding the pipeline at "
                    "the last delivered batch", _first_line(error), count, listed)
        self._pipe, self._batches_per_epoch = self._build(self.epoch, self._checkpoint)

    def _find_bad_samples(self) -> dict[str, set]:
        """Replay this epoch's reads up to the failing batches with a reader-only pipeline; decode them with Pillow."""
        pipe, _ = self._build(self.epoch, reader_only=True, prefetch=1)
        suspects: list[tuple[str, bytes]] = []
        for i in range(self.batch_in_epoch + self.prefetch):
            raw, lengths, sources = pipe.run()
            if i < self.batch_in_epoch:
                continue
            for j in range(len(sources)):
                source = bytes(np.asarray(sources[j])).rstrip(b"\0").decode()
                n = int(np.asarray(lengths[j]).reshape(-1)[0])
                suspects.append((source, bytes(np.asarray(raw[j])[:n])))
        del pipe
        bad: dict[str, set] = {}
        for source, data in suspects:
            try:
                decode_image(data)
            except CorruptSample:
                url, name = _parse_source(source)
                bad.setdefault(url, set()).add(name)
        if not bad:  # Pillow decodes them all: DALI rejects one of them; give up the failing batches entirely
            for source, _ in suspects:
                url, name = _parse_source(source)
                bad.setdefault(url, set()).add(name)
        return {self._canonical(u): n for u, n in bad.items()}

    def _canonical(self, url: str) -> str:
        if url in self.indexes:
            return url
        for f in self.indexes:
            if os.path.abspath(f) == os.path.abspath(url):
                return f
        return url

    def _write_override(self, url: str) -> None:
        """This rank's copy of `url`'s index without the bad samples (the shared index is never modified)."""
        if self._work_dir is None:
            self._work_dir = tempfile.mkdtemp(prefix="fastenc-dali-")
        os.makedirs(self._work_dir, exist_ok=True)
        names = self._bad[url]
        with open(self.indexes[url]) as f:
            lines = f.read().splitlines()[1:]
        keep = [ln for ln in lines if not any(part in names for part in ln.split()[3::4])]
        digest = hashlib.sha256(url.encode()).hexdigest()[:12]
        path = os.path.join(self._work_dir, f"rank{self.rank}-{digest}.idx")
        atomic.write_text(path, f"v1.2 {len(keep)}\n" + "".join(ln + "\n" for ln in keep), fsync=False)
        self._overrides[url] = path


def _parse_source(source: str) -> tuple[str, str]:
    """'path/shard.tar:offset:member' -> (path, member)."""
    head, _, name = source.rpartition(":")
    url, _, _ = head.rpartition(":")
    return url, name


def _is_decode_error(error: BaseException) -> bool:
    """A failure of a decoder operator (bad data), as opposed to a pipeline or configuration error."""
    return "fn.decoders." in str(error)


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "decode" in ln.lower() or "failure" in ln.lower()), lines[0] if lines else "")
    return detail[:300]


def _count_index(path: str, *, ext: str | None) -> int:
    """Samples of an index file (with ext, e.g. "txt": only lines that list a member with that extension)."""
    with open(path) as f:
        header = f.readline().split()
        if len(header) != 2 or not header[0].startswith("v1"):
            raise ValueError(f"{path} is not a DALI webdataset index (header {' '.join(header)!r})")
        if ext is None:
            return int(header[1])
        return sum(1 for ln in f if ext in ln.split()[0::4])

