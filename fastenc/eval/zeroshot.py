"""Zero-shot classification for CLIP/SigLIP-style encoders, on precomputed embeddings.

Each class gets one text embedding: every template filled with the class name is encoded, the embeddings are
L2-normalized, averaged and renormalized (open_clip's build_zero_shot_classifier). An image is classified by the
cosine similarity of its embedding to every class embedding.

Ranking rule (shared with fastenc.eval.retrieval): the true class's rank is the number of OTHER classes scoring at
least as high, and a sample is top-k correct when that rank is < k. Ties therefore count against the sample (a
collapsed encoder whose scores all tie scores 0, not 1/C), and the result never depends on topk's tie order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# A handful of generic prompts in the spirit of CLIP's ImageNet templates (open_clip ships 80; too many to copy
# here and tuned to photographs). They suit the synthetic shapes data; a suite with its own domain passes its own.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a rendering of a {}.",
    "a {}.",
)


def fill_template(template: str, class_name: str) -> str:
    """The template with its placeholder(s) replaced: `{}` and `{c}` both stand for the class name."""
    return template.format(class_name, c=class_name)


@torch.no_grad()
def class_text_embeddings(class_names: Sequence[str], templates: Sequence[str],
                          encode_text: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """Zero-shot classifier weights [C, E] (fp32, unit rows): per class, the renormalized mean of the L2-normalized
    embeddings of its filled templates.

    encode_text: list of T strings -> [T, E] embeddings (the text tower plus its tokenizer); called once per class
    with that class's T filled templates, under torch.no_grad()."""
    class_names, templates = list(class_names), list(templates)
    if not class_names:
        raise ValueError("no class names: give one name per class, in label order")
    if not templates:
        raise ValueError("no templates: give at least one, e.g. 'a photo of a {}.' (or use DEFAULT_TEMPLATES)")
    for t in templates:
        try:
            filled = fill_template(t, "\x00")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"template {t!r} cannot be filled ({type(e).__name__}: {e}): use `{{}}` or `{{c}}` for "
                             "the class name and `{{{{`/`}}}}` for literal braces") from e
        if "\x00" not in filled:
            raise ValueError(f"template {t!r} has no class-name placeholder (`{{}}` or `{{c}}`): it would give every "
                             "class the same text")
    rows = []
    for name in class_names:
        texts = [fill_template(t, name) for t in templates]
        emb = encode_text(texts)
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(texts):
            shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"encode_text must return a [T, E] tensor for T={len(texts)} texts (got {shape})")
        emb = emb.float()
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"encode_text returned NaN/inf embeddings for class {name!r}")
        if rows and emb.shape[1] != rows[0].shape[0]:
            raise ValueError(f"encode_text returned width {emb.shape[1]} for class {name!r} but "
                             f"{rows[0].shape[0]} before")
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_accuracy(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                       topk: Sequence[int] = (1, 5), chunk: int = 4096) -> dict[str, float]:
    """{"top1": ..., "top5": ...}: fraction of images whose true class ranks within the top k by cosine similarity.

    image_emb [N, E], labels [N] class ids (row i of class_emb is class i), class_emb [C, E] (e.g. from
    class_text_embeddings). Both sides are L2-normalized here. Ties count against the image (module docstring);
    k >= C counts every image correct. Chunked over N: memory is O(chunk x C)."""
    if image_emb.ndim != 2 or class_emb.ndim != 2:
        raise ValueError(f"image_emb and class_emb must be [N, E] and [C, E] (got {tuple(image_emb.shape)} and "
                         f"{tuple(class_emb.shape)})")
    if labels.ndim != 1 or len(labels) != len(image_emb):
        raise ValueError(f"labels must be [N] with N = {len(image_emb)} image rows (got shape {tuple(labels.shape)})")
    if len(image_emb) == 0:
        raise ValueError("no images: image_emb is empty")
    if len(class_emb) == 0:
        raise ValueError("no classes: class_emb is empty")
    if image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(f"embedding widths differ: image_emb has {image_emb.shape[1]} dims, class_emb "
                         f"{class_emb.shape[1]} (the image and text projections must share one embedding space)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class ids (got dtype {labels.dtype})")
    C = len(class_emb)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= C:
        raise ValueError(f"class-count mismatch: labels go from {lo} to {hi} but class_emb has {C} classes (one row "
                         "per class name, in label order)")
    ks = [int(k) for k in topk]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"topk must be a non-empty list of ints >= 1 (got {list(topk)})")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 (got {chunk})")
    weights = F.normalize(class_emb.float(), dim=-1)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("class_emb has NaN/inf values")
    labels = labels.to(weights.device).long()
    hits = {k: 0 for k in ks}
    for start in range(0, len(image_emb), chunk):
        x = image_emb[start:start + chunk].to(weights.device).float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"image_emb has NaN/inf values (rows {start}..{start + len(x) - 1})")
        scores = F.normalize(x, dim=-1) @ weights.T  # [n, C]
        true = scores.gather(1, labels[start:start + chunk, None])
        rank = (scores >= true).sum(dim=1) - 1  # other classes at least as similar as the true one
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {f"top{k}": hits[k] / len(image_emb) for k in ks}
