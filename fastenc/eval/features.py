"""Frozen features of an encoder over an evaluation dataset: batched, with a progress bar, cached on disk.

Datasets (`dataset_from_spec`):
    ImageFolder    root/<class>/<image>: one subfolder per class (the ImageNet layout); labels {"label": class
                   index}, class names from the sorted folder names (or a `classes` file, one name per line).
    Shards         webdataset shards; labels are integer fields of each sample's .json (e.g. category_id, color_id,
                   style_id, word_id; -1 stays -1 = "absent"; "FIELD:present" is 1 where FIELD is set and >= 0,
                   else 0: "word_id:present" = an image has a word), captions from .txt when asked for.
Both read with the evaluation transform (resize the shorter side + center crop, ImageTextSpec(train=False)) in one
pass in a deterministic order, so features line up with labels and captions. Image folders: sorted order. Shards:
build_loader's fixed seeded permutation of the shard list (it has no unpermuted mode), each shard front to back.

Features (`FeatureSpec`): the CLS token (pool="cls") or the mean of the patch tokens (pool="mean") of block `layer`
(-1: the last), after the encoder's final LayerNorm (applied to intermediate blocks too, as DINO's and DINOv2's
intermediate-layer evaluations do), L2-normalized unless normalize=False. The final LayerNorm is `norm` on the
tokens, or, for encoders that normalize after pooling (global_pool="avg": `norm` is Identity), `fc_norm` on the
pooled vector, as their own forward_head does.

Cache: `cache_dir/<key>.safetensors` (features, labels) and `cache_dir/<key>.json` (ids, captions, class names: ids
of an ImageNet-size set exceed the ~100 MB limit of a safetensors header). key = hash of the checkpoint file's path,
size and mtime (ns); the dataset settings; the data on disk: every shard's path, size and mtime, or an image
folder's root and class subfolders' paths and mtimes (a folder's mtime changes when entries are added, removed or
renamed in it; no image is stat'ed) plus the bytes of the classes file; the feature spec; the image size; and the
caller's `extra_key` (e.g. the identity of an image-text run's objective file, for joint-space features). Not
covered: an image rewritten in place, or a change only inside a nested subfolder of a class folder: delete the
cache entry then. Both files are written atomically, the .json first; an entry counts only when both exist. Loaded
without pickle. A cache that cannot be written is logged and skipped: the extracted features are still returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from fastenc.data.transforms import IMAGE_EXTENSIONS, CorruptSample, decode_caption, decode_image, image_transform, \
    locate_image
from fastenc.utils import atomic

log = logging.getLogger(__name__)


class EvalDataError(ValueError):
    """An evaluation dataset or encoder that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class FeatureSpec:
    layer: int = -1
    pool: Literal["cls", "mean"] = "cls"
    normalize: bool = True
    space: Literal["encoder", "joint"] = "encoder"
    """encoder: the ViT's tokens (layer, pool); joint: an image-text run's shared embedding (EvalRun.encode_image,
    for zero-shot and retrieval), given to extract() as `embed`."""

    def __post_init__(self):
        if self.pool not in ("cls", "mean"):
            raise EvalDataError(f"feature pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.space not in ("encoder", "joint"):
            raise EvalDataError(f"feature space must be 'encoder' or 'joint', got {self.space!r}")


@dataclass
class Features:
    """feats [N, D] fp32; labels {name: LongTensor[N]}; captions (or None); ids: one string per sample."""

    feats: torch.Tensor
    labels: dict = field(default_factory=dict)
    captions: list | None = None
    ids: list = field(default_factory=list)
    classes: dict = field(default_factory=dict)
    """{label name: [class names]} where known (image folders)."""


# ----------------------------------------------------------------------------------------------------------------
# datasets


def _class_folders(root: str) -> list[str]:
    """The class subfolder names of an image folder, sorted (hidden ones skipped); shared by the dataset and the
    cache key so both see the same classes."""
    if not os.path.isdir(root):
        raise EvalDataError(f"image folder {root!r} does not exist")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not folders:
        raise EvalDataError(f"{root!r} has no class subfolders (expected root/<class>/<image>, the ImageNet layout)")
    return folders


def _read_classes_file(path: str) -> bytes:
    """The raw bytes of a classes file: the dataset parses them, the cache key hashes them."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise EvalDataError(f"classes file {path!r} cannot be read ({e.strerror}): give a text file with one class "
                            "name per line, in the sorted order of the class folders") from e


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image> (recursively below each class folder); class index = position in sorted names.
    max_samples > 0: a seeded uniform subset of that many images (see DatasetSpec)."""

    def __init__(self, root: str, image_size: int, classes_file: str | None = None, max_samples: int = 0):
        folders = _class_folders(root)
        self.classes = folders
        if classes_file:
            names = [ln.strip() for ln in _read_classes_file(classes_file).decode().splitlines() if ln.strip()]
            if len(names) != len(folders):
                raise EvalDataError(f"class-count mismatch: {classes_file} lists {len(names)} class names but {root} "
                                    f"has {len(folders)} class folders")
            self.classes = names
        self.items = []
        # Absolute paths: the ids (stored in the cache) must point at the images from any working directory.
        for label, d in enumerate(folders):
            for dirpath, _, files in sorted(os.walk(os.path.join(os.path.abspath(root), d))):
                for name in sorted(files):
                    if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                        self.items.append((os.path.join(dirpath, name), label))
        if not self.items:
            raise EvalDataError(f"no images (.jpg/.jpeg/.png/.webp) under the class folders of {root!r}")
        if 0 < max_samples < len(self.items):
            # The first N in sorted order would be only the first few classes; keep the subset in listing order.
            keep = sorted(random.Random(0).sample(range(len(self.items)), max_samples))
            self.items = [self.items[i] for i in keep]
        self.transform = image_transform(image_size, train=False)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with open(path, "rb") as f:
                image = self.transform(decode_image(f.read()))
        except (OSError, CorruptSample) as e:
            log.warning("skipping %s: %s", path, e)
            return None
        return {"image": image, "labels": torch.tensor([label]), "id": path}


class _ShardSample:
    """sample_fn for shards: image (eval transform), the .json label fields (LongTensor[L]), optionally the caption."""

    def __init__(self, image_size: int, label_keys: list[str], captions: bool):
        self.transform = image_transform(image_size, train=False)
        self.label_keys, self.captions = list(label_keys), captions
        self.fields = [k.partition(":")[0] for k in self.label_keys]
        for k in self.label_keys:
            if k.partition(":")[2] not in ("", "present"):
                raise EvalDataError(f"label {k!r}: the only derived label is FIELD:present (e.g. word_id:present)")

    @staticmethod
    def _value(meta: dict, key: str) -> int:
        field, _, derived = key.partition(":")
        v = -1 if meta[field] is None else int(meta[field])
        return int(v >= 0) if derived == "present" else v

    def __call__(self, sample: dict) -> dict:
        where, ext = locate_image(sample)
        out = {"id": f"{os.path.basename(sample.get('__url__', '?'))}:{sample.get('__key__', '?')}"}
        if self.label_keys:
            if "json" not in sample:
                raise CorruptSample(f"{where} has no .json with the labels {self.label_keys}")
            meta = json.loads(sample["json"])
            missing = [k for k in self.fields if k not in meta]
            if missing:
                raise CorruptSample(f"{where}: .json has no {missing[0]!r} (it has: {', '.join(sorted(meta))})")
            out["labels"] = torch.tensor([self._value(meta, k) for k in self.label_keys])
        else:
            out["labels"] = torch.zeros(0, dtype=torch.long)
        if self.captions:
            if "txt" not in sample:
                raise CorruptSample(f"{where} has no caption (.txt)")
            out["caption"] = decode_caption(sample["txt"])
        out["image"] = self.transform(decode_image(sample[ext]))
        return out


def _collate(items):
    items = [it for it in items if it is not None]
    if not items:
        return None
    out = {"image": torch.stack([it["image"] for it in items]), "labels": torch.stack([it["labels"] for it in items]),
           "id": [it["id"] for it in items]}
    if "caption" in items[0]:
        out["caption"] = [it["caption"] for it in items]
    return out


@dataclass(frozen=True)
class DatasetSpec:
    """What to evaluate on: an image folder (`folder`, optionally `classes_file`: one class name per line, in the
    sorted order of the class folders) or shards (`shards`, with .json `labels` and .txt `captions`).

    max_samples (0: all): on an image folder, a uniformly random subset of the images (seed 0: the same subset every
    time; kept in sorted order), because the first N in sorted order would be only the first few classes. On
    shards, the first N samples in reading order (see the module docstring), a fair sample because shards are
    written shuffled (synthetic sets, webdatasets); with several loader workers, which N also depends on
    num_workers and batch_size, so the cache key then includes them.
    """

    folder: str = ""
    shards: str = ""
    labels: tuple = ()
    captions: bool = False
    classes_file: str = ""
    max_samples: int = 0

    def __post_init__(self):
        if bool(self.folder) == bool(self.shards):
            raise EvalDataError("a dataset needs exactly one of `folder` (class subfolders) or `shards`")
        if self.folder and self.captions:
            raise EvalDataError(f"image folder {self.folder!r}: image folders have no captions: use shards with .txt "
                                "for retrieval, or drop `captions`")
        if self.folder and tuple(self.labels) not in ((), ("label",)):
            raise EvalDataError(f"image folder {self.folder!r}: its only label is 'label' (the class folder), got "
                                f"labels {list(self.labels)}: drop `labels`, or use shards whose .json has those "
                                "fields")

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _shard_paths(dataset: DatasetSpec) -> list[str]:
    """The dataset's shard files (expand_shards), with a missing shard as an EvalDataError."""
    from fastenc.data.shards import expand_shards

    try:
        return expand_shards(dataset.shards)
    except FileNotFoundError as e:
        raise EvalDataError(f"dataset shards: {e}") from e


def _batches(dataset: DatasetSpec, image_size: int, batch_size: int, num_workers: int):
    if dataset.folder:
        ds = ImageFolder(dataset.folder, image_size, dataset.classes_file or None, dataset.max_samples)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                             collate_fn=_collate)
        return loader, len(ds), {"label": ds.classes}, ["label"]
    from fastenc.data.loader import build_loader

    labels = list(dataset.labels)
    paths = _shard_paths(dataset)
    # a worker reads whole shards: more workers than shards would leave some without data (build_loader refuses)
    num_workers = min(num_workers, len(paths))
    loader = build_loader(paths, sample_fn=_ShardSample(image_size, labels, dataset.captions),
                          batch_size=batch_size, num_workers=num_workers, shuffle_buffer=0, resampled=False,
                          drop_last=False, collate_fn=_collate_shards)
    return loader, None, {}, labels


def _collate_shards(items):
    batch = _collate(items)
    if batch is None:
        raise ValueError("empty batch")
    return batch


# ----------------------------------------------------------------------------------------------------------------
# extraction


def file_identity(path: str) -> list:
    """[absolute path, size, mtime in ns] of a file or folder: whole-second mtimes miss a rewrite within a second."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _data_identity(dataset: DatasetSpec) -> list:
    """The state of the dataset on disk, for the cache key (what it covers: the module docstring's "Cache:")."""
    if dataset.shards:
        # Remote shards (URLs, pipe:) cannot be stat'ed: their name is all there is to key on.
        return [file_identity(p) if os.path.exists(p) else p for p in _shard_paths(dataset)]
    root = dataset.folder
    identity = [file_identity(root)] + [file_identity(os.path.join(root, d)) for d in _class_folders(root)]
    if dataset.classes_file:
        identity.append(hashlib.sha256(_read_classes_file(dataset.classes_file)).hexdigest())
    return identity


def cache_key(checkpoint: str, dataset: DatasetSpec, spec: FeatureSpec, image_size: int,
              extra_key: str | None = None) -> str:
    """Hash of what the features depend on: the checkpoint file, the dataset's settings and data on disk, the
    feature spec, the image size and the caller's extra_key."""
    blob = json.dumps([file_identity(checkpoint), dataset.describe(), _data_identity(dataset), asdict(spec),
                       image_size, extra_key], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _pool(encoder, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    if spec.layer == -1:
        tokens = encoder.forward_features(images)
    else:
        tokens = encoder.norm(encoder.forward_intermediates(images, [spec.layer])[0])
    prefix = getattr(encoder, "num_prefix_tokens", 1)
    feats = tokens[:, 0] if spec.pool == "cls" else tokens[:, prefix:].mean(dim=1)
    fc_norm = getattr(encoder, "fc_norm", None)
    if fc_norm is not None and not isinstance(fc_norm, torch.nn.Identity):
        # Encoders that normalize after pooling (global_pool="avg"): `norm` above was Identity; this is their final
        # LayerNorm, as in their forward_head. Token-pooled encoders have an Identity fc_norm and skip this.
        feats = fc_norm(feats)
    feats = feats.float()
    return F.normalize(feats, dim=-1) if spec.normalize else feats


@torch.no_grad()
def extract(encoder, dataset: DatasetSpec, spec: FeatureSpec = FeatureSpec(), *, checkpoint: str | None = None,
            cache_dir: str | None = None, batch_size: int = 256, num_workers: int = 0, device="cpu",
            progress: str | None = "features", embed=None, extra_key: str | None = None) -> Features:
    """Features of `encoder` (a fastenc/timm ViT) over `dataset`, read from / written to the cache when
    `checkpoint` (the encoder's file, part of the key) and `cache_dir` are given. spec.space == "joint": the
    features are embed(images) (EvalRun.encode_image) instead of the encoder's tokens. extra_key: anything else
    the features depend on that only the caller knows (e.g. the identity of the image-text objective file behind
    `embed`), mixed into the cache key."""
    if spec.space == "joint" and embed is None:
        raise EvalDataError("joint-space features need `embed` (an image-text run's encode_image)")
    image_size = int(encoder.img_size)
    stem = None
    if cache_dir and checkpoint:
        # The first max_samples of shards depend on how workers interleave them: then the layout is part of the key.
        layout = f"workers={num_workers},batch={batch_size}" if dataset.shards and dataset.max_samples else None
        stem = os.path.join(cache_dir, cache_key(checkpoint, dataset, spec, image_size,
                                                 extra_key if layout is None else f"{extra_key}|{layout}"))
        if os.path.isfile(stem + ".json") and os.path.isfile(stem + ".safetensors"):
            return _load(stem)
    loader, total, classes, label_names = _batches(dataset, image_size, batch_size, num_workers)
    limit = dataset.max_samples or None
    encoder = encoder.to(device)
    was_training = encoder.training
    encoder.eval()
    feats, labels, captions, ids = [], [], [], []
    from tqdm import tqdm

    bar = tqdm(desc=progress, unit="img", total=total or limit, leave=False, disable=not progress)
    n = 0
    for batch in loader:
        if batch is None:
            continue
        images = batch["image"].to(device)
        feats.append((embed(images).float() if spec.space == "joint" else _pool(encoder, images, spec)).cpu())
        labels.append(batch["labels"])
        captions += batch.get("caption", [])
        ids += batch["id"]
        n += len(batch["id"])
        bar.update(len(batch["id"]))
        if limit and n >= limit:
            break
    bar.close()
    encoder.train(was_training)
    if not feats:
        raise EvalDataError(f"no usable samples in {dataset.folder or dataset.shards!r}")
    f = torch.cat(feats)[:limit]
    lab = torch.cat(labels)[:limit]
    out = Features(f, {name: lab[:, i].contiguous() for i, name in enumerate(label_names)},
                   captions[:limit] if dataset.captions else None, ids[:limit], classes)
    if stem:
        try:
            _save(out, stem)
        except (OSError, SafetensorError) as e:
            log.warning("could not write the feature cache %s.{json,safetensors} (%s: %s); the features are used "
                        "uncached: make cache_dir writable and give it space, or pass no cache_dir", stem,
                        type(e).__name__, e)
    return out


def _save(feats: Features, stem: str) -> None:
    """<stem>.json (ids, captions, classes, label order) first, <stem>.safetensors (feats, labels) last: an entry
    is read only when both exist, so an interrupted write leaves no entry that looks complete."""
    from safetensors.torch import save_file

    atomic.write_json(stem + ".json", {"ids": feats.ids, "captions": feats.captions, "classes": feats.classes,
                                       "labels": list(feats.labels)}, indent=None)
    tensors = {"feats": feats.feats.contiguous(), **{f"label.{k}": v for k, v in feats.labels.items()}}
    with atomic.atomic_path(stem + ".safetensors") as tmp:
        save_file(tensors, tmp)


def _load(stem: str) -> Features:
    from safetensors.torch import load_file

    tensors = load_file(stem + ".safetensors")
    with open(stem + ".json", encoding="utf-8") as f:
        meta = json.load(f)
    # in the dataset's order (safetensors stores tensors sorted by name)
    labels = {k: tensors[f"label.{k}"] for k in meta["labels"]}
    return Features(tensors["feats"], labels, meta["captions"], meta["ids"], meta["classes"])


def encoder_checkpoint(source: str) -> str:
    """The encoder file of a run dir (its export) or the given .safetensors; a clear error if the run dir has none
    (the export is written when a run finishes)."""
    from fastenc.run.weights import encoder_file

    try:
        return encoder_file(source)
    except FileNotFoundError as e:
        raise EvalDataError(str(e)) from e
