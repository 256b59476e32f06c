"""Weighted k-NN classification on frozen encoder features (DINO's eval_knn protocol).

Features: the encoder's pooled output (CLS token after the final norm) of eval-transformed images, L2-normalized
here (knn_classify normalizes whatever it is given, as DINO's eval_knn does). For each test feature the k most
cosine-similar train features vote with weight exp(sim / T) for their label
(k = 20, T = 0.07 as in facebookresearch/dino); top-1 accuracy over the test set. Labels are integer fields of the
samples' .json (for the synthetic study data: category_id, color_id, style_id).
"""

from __future__ import annotations

import json

import torch

from fastenc.data.transforms import CorruptSample, decode_image, image_transform, locate_image


class LabelledImage:
    """sample_fn: raw sample -> {"image": transformed [3,S,S], "label": int64 [L] from the .json fields}.

    train=False: the eval transform (resize + center crop); True: open_clip's train transform (random resized crop),
    for supervised calibration runs (benchmarks/shape_ceiling.py)."""

    def __init__(self, image_size: int, label_keys, train: bool = False):
        self.transform = image_transform(image_size, train=train)
        self.label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)

    def __call__(self, sample: dict) -> dict:
        if "json" not in sample:
            raise CorruptSample(f"sample {sample.get('__key__', '?')!r} has no .json with labels")
        meta = json.loads(sample["json"])
        missing = [k for k in self.label_keys if k not in meta]
        if missing:
            raise CorruptSample(f"sample {sample.get('__key__', '?')!r}: .json has no {missing[0]!r} "
                                f"(keys: {sorted(meta)})")
        where, ext = locate_image(sample)
        try:
            image = decode_image(sample[ext])
        except CorruptSample as e:
            raise CorruptSample(f"{where}: {e}") from e
        return {"image": self.transform(image),
                "label": torch.tensor([int(meta[k]) for k in self.label_keys], dtype=torch.long)}


def extract_features(encoder, shards, label_key, *, max_samples: int | None = None, batch_size: int = 256,
                     num_workers: int = 0, device="cpu", progress: str | None = None):
    """(features [N, D] L2-normalized fp32, labels) over one pass of `shards` in order (no shuffle): the CLS token
    after the final norm, through fastenc.eval.features.extract (no cache).

    label_key: one .json field (labels [N]) or a list of fields (labels [N, len(list)], one pass for all)."""
    from fastenc.eval.features import DatasetSpec, extract

    keys = [label_key] if isinstance(label_key, str) else list(label_key)
    f = extract(encoder, DatasetSpec(shards=shards, labels=tuple(keys), max_samples=max_samples or 0),
                batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    labels = torch.stack([f.labels[k] for k in keys], dim=1)
    return f.feats, (labels[:, 0] if isinstance(label_key, str) else labels)


def knn_classify(train_feats, train_labels, test_feats, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int | None = None, device=None) -> torch.Tensor:
    """Predicted labels [N_test] (CPU): weighted vote of the k nearest train features by cosine (both sides are
    L2-normalized here), weights exp(sim / T). Runs on `device` (default: where the features are). Test rows go
    in chunks whose [chunk, N_train] similarity block holds at most 2^27 values (512 MiB fp32; ImageNet's 1.28M
    train images: 104 rows), unless `chunk` is given."""
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature widths differ: train {train_feats.shape[1]}, test {test_feats.shape[1]}")
    if train_feats.shape[0] == 0 or len(train_labels) != train_feats.shape[0]:
        raise ValueError(f"need one label per train feature and at least one ({train_feats.shape[0]} features, "
                         f"{len(train_labels)} labels)")
    if int(train_labels.min()) < 0:
        raise ValueError("train labels must be >= 0 (drop the samples whose label is -1, 'absent', first)")
    device = torch.device(device) if device is not None else train_feats.device
    train_feats = torch.nn.functional.normalize(train_feats.to(device).float(), dim=1)
    train_labels = train_labels.to(device)
    C = int(num_classes if num_classes is not None else train_labels.max() + 1)
    k = min(k, train_feats.shape[0])
    chunk = chunk or max(1, min(4096, (1 << 27) // train_feats.shape[0]))
    preds = []
    for start in range(0, test_feats.shape[0], chunk):
        test = torch.nn.functional.normalize(test_feats[start:start + chunk].to(device).float(), dim=1)
        sim = test @ train_feats.T  # [n, N_train]
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], C, dtype=sim.dtype, device=device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(dim=1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, **kw) -> float:
    if len(test_labels) == 0:
        raise ValueError("no test samples to score")
    return float((knn_classify(train_feats, train_labels, test_feats, **kw) == test_labels.cpu()).float().mean())

