"""Linear probe on frozen encoder features: the protocol of "Data or Language Supervision: What Makes CLIP Better
than DINO?" (the authors' code).

Features are standardized per dimension with the statistics of the TRAIN set (the test set reuses them), then one
nn.Linear(D, C) is trained with AdamW and cross-entropy on shuffled mini-batches (default 2048) for `epochs` (50),
the learning rate warming up linearly for `warmup_epochs` (10) and then decaying on a cosine, per step.
(lr, weight decay) come from a grid (lr {1e-6, 1e-5, 1e-4, 1e-3} x wd {0, 1e-6, 1e-3}): each point is trained for
`search_epochs` (5) on the train set minus a stratified held-out `holdout_fraction` (10 %) and scored on that
held-out part; the winner is retrained on the full train set, evaluated on the test set after every epoch, and the
best of those test accuracies is reported (the paper reports best validation accuracy), with the final one.

The paper's tiny learning rates suit its setting (unnormalized ViT-B CLS tokens of ImageNet, 625 steps per epoch).
A toy suite with a few hundred samples takes a handful of steps per epoch and passes a wider grid and a smaller batch
(e.g. lrs=(1e-4, 1e-3, 1e-2, 1e-1), batch_size=64); the defaults stay the paper's.

Works on precomputed tensors only (features [N, D], integer labels [N]); deterministic given `seed` (on one device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

PAPER_LRS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3)
PAPER_WDS: tuple[float, ...] = (0.0, 1e-6, 1e-3)
STD_FLOOR = 1e-6


@dataclass
class ProbeResult:
    """Outcome of `linear_probe`.

    best_accuracy / best_epoch: the highest test top-1 over the final run's epochs and its (1-based) epoch;
    final_accuracy: test top-1 after the last epoch; lr / weight_decay: the chosen grid point;
    search: one row per grid point {"lr", "weight_decay", "holdout_accuracy", "holdout_loss"} (None values when the
    grid has a single point and no search ran); curve: test top-1 after each epoch of the final run."""

    best_accuracy: float
    final_accuracy: float
    best_epoch: int
    lr: float
    weight_decay: float
    search: list[dict] = field(default_factory=list)
    curve: list[float] = field(default_factory=list)


def fit_standardization(train_x: torch.Tensor, std_floor: float = STD_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], scale [D]) of the train features; apply as (x - mean) / scale to train AND test features.

    scale is the per-dimension std (population, fp32), floored: a dimension whose train std is below `std_floor`
    (constant over the train set) gets scale 1, i.e. it is only centered, as sklearn's StandardScaler does, so a
    test-time wobble on a dimension that never varied in training is not blown up by 1 / std."""
    x = train_x.float()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    scale = torch.where(std < std_floor, torch.ones_like(std), std)
    return mean, scale


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 num_classes: int | None = None, lrs: Sequence[float] = PAPER_LRS,
                 wds: Sequence[float] = PAPER_WDS, epochs: int = 50, warmup_epochs: float = 10,
                 search_epochs: int = 5, batch_size: int = 2048, holdout_fraction: float = 0.1, seed: int = 0,
                 device: str | torch.device = "cpu", progress: bool = False) -> ProbeResult:
    """Linear-probe top-1 accuracy of frozen features (the paper's protocol; see the module docstring).

    num_classes: default max label (train and test) + 1. The grid search is skipped when lrs x wds has one point.
    The search runs `search_epochs` with the warmup scaled in proportion (warmup_epochs * search_epochs / epochs),
    standardizes with the statistics of its own training part, and ranks grid points by held-out accuracy, then by
    held-out loss (many points tie at 100 % on easy data), then by grid order. Every run (each grid point and the
    final one) starts from the same seeded initialization and batch order."""
    _check_split("train", train_x, train_y)
    _check_split("test", test_x, test_y)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"feature widths differ: train_x has {train_x.shape[1]} dims, test_x {test_x.shape[1]} "
                         "(both must come from the same encoder output)")
    top = int(max(train_y.max(), test_y.max()))
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        raise ValueError(f"class-count mismatch: labels go up to {top} but num_classes={num_classes} "
                         f"(pass num_classes >= {top + 1}, or remap the labels to 0..num_classes-1)")
    lrs, wds = [float(v) for v in lrs], [float(v) for v in wds]
    if not lrs or not wds:
        raise ValueError(f"empty hyperparameter grid: lrs={lrs}, wds={wds} (give at least one value of each)")
    if any(v <= 0 for v in lrs) or any(v < 0 for v in wds):
        raise ValueError(f"learning rates must be > 0 and weight decays >= 0 (got lrs={lrs}, wds={wds})")
    if epochs < 1 or search_epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs, search_epochs and batch_size must be >= 1 (got {epochs}, {search_epochs}, "
                         f"{batch_size})")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}] (got {warmup_epochs})")
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1) (got {holdout_fraction})")

    train_x, test_x = train_x.float(), test_x.float()
    train_y, test_y = train_y.long(), test_y.long()
    grid = [(lr, wd) for lr in lrs for wd in wds]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(len(grid) * search_epochs if len(grid) > 1 else 0) + epochs, desc="linear probe",
                   unit="epoch", leave=False)

    search: list[dict] = []
    if len(grid) == 1:
        (lr, wd), = grid
        search.append({"lr": lr, "weight_decay": wd, "holdout_accuracy": None, "holdout_loss": None})
    else:
        fit_idx, hold_idx = _stratified_holdout(train_y, num_classes, holdout_fraction, seed)
        fx, fy, hx, hy = _standardized(train_x[fit_idx], train_y[fit_idx], train_x[hold_idx], train_y[hold_idx],
                                       device)
        search_warmup = warmup_epochs * search_epochs / epochs
        for lr, wd in grid:
            model = _train(fx, fy, num_classes, lr=lr, wd=wd, epochs=search_epochs, warmup_epochs=search_warmup,
                           batch_size=batch_size, seed=seed, bar=bar)
            acc, loss = _evaluate(model, hx, hy)
            search.append({"lr": lr, "weight_decay": wd, "holdout_accuracy": acc, "holdout_loss": loss})
        # max accuracy, then min loss, then grid order (max() keeps the first of equal keys)
        best = max(range(len(grid)), key=lambda i: (search[i]["holdout_accuracy"], -search[i]["holdout_loss"],
                                                    -i))
        lr, wd = grid[best]

    tx, ty, vx, vy = _standardized(train_x, train_y, test_x, test_y, device)
    curve: list[float] = []
    _train(tx, ty, num_classes, lr=lr, wd=wd, epochs=epochs, warmup_epochs=warmup_epochs, batch_size=batch_size,
           seed=seed, bar=bar, on_epoch=lambda m, e: curve.append(_evaluate(m, vx, vy)[0]))
    if bar is not None:
        bar.close()
    best_epoch = max(range(len(curve)), key=lambda i: (curve[i], -i)) + 1
    return ProbeResult(best_accuracy=curve[best_epoch - 1], final_accuracy=curve[-1], best_epoch=best_epoch, lr=lr,
                       weight_decay=wd, search=search, curve=curve)


def _check_split(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} features and labels must be torch tensors (got {type(x).__name__}, "
                         f"{type(y).__name__})")
    if x.ndim != 2:
        raise ValueError(f"{name}_x must be [N, D] features (got shape {tuple(x.shape)})")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{name}_y must be [N] labels matching {name}_x's {len(x)} rows (got shape {tuple(y.shape)})")
    if len(x) == 0:
        raise ValueError(f"empty {name} set: no samples to probe with")
    if x.shape[1] == 0:
        raise ValueError(f"{name}_x has zero feature dims")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name}_y must hold integer class ids (got dtype {y.dtype})")
    if int(y.min()) < 0:
        raise ValueError(f"{name}_y has negative labels (min {int(y.min())}): labels must be class ids 0..C-1")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name}_x has NaN/inf features in {bad} of {len(x)} rows (check the feature extraction, "
                         "e.g. fp16 overflow)")


def _stratified_holdout(y: torch.Tensor, num_classes: int, fraction: float,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): round(fraction * n_c) random samples of each class c are held out, at most
    n_c - 1 (a class keeps at least one training sample). Seeded."""
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    perm = torch.randperm(len(y), generator=g)
    order = perm[torch.argsort(y[perm], stable=True)]  # grouped by class, random within a class
    counts = torch.bincount(y, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    ys = y[order]
    rank = torch.arange(len(y)) - starts[ys]
    take = torch.minimum(torch.floor(counts.double() * fraction + 0.5).long(), (counts - 1).clamp_min(0))
    held = rank < take[ys]
    fit_idx, hold_idx = order[~held], order[held]
    if len(hold_idx) == 0:
        raise ValueError(f"training set too small for a held-out split: {len(y)} samples x holdout_fraction="
                         f"{fraction} holds out none; give more samples, a larger holdout_fraction, or a single "
                         "(lr, wd) grid point to skip the search")
    return fit_idx.sort().values, hold_idx.sort().values


def _standardized(train_x, train_y, test_x, test_y, device):
    mean, scale = fit_standardization(train_x)
    return (((train_x - mean) / scale).to(device), train_y.to(device),
            ((test_x - mean) / scale).to(device), test_y.to(device))


def _lr_at(step: int, base: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to `base` over warmup_steps, then cosine decay towards 0 at total_steps."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def _train(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, lr: float, wd: float, epochs: int,
           warmup_epochs: float, batch_size: int, seed: int, on_epoch=None, bar=None) -> nn.Linear:
    """Train nn.Linear(D, C) on standardized x; on_epoch(model, epoch), if given, runs after each (1-based) epoch."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(x.shape[1], num_classes)
    bound = 1.0 / math.sqrt(x.shape[1])  # nn.Linear's default init distribution, drawn from the seeded generator
    with torch.no_grad():
        model.weight.uniform_(-bound, bound, generator=g)
        model.bias.uniform_(-bound, bound, generator=g)
    model = model.to(x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=g).to(x.device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, lr, warmup, total)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if on_epoch is not None:
            on_epoch(model, epoch)
        if bar is not None:
            bar.update(1)
    return model


@torch.no_grad()
def _evaluate(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of the linear model on standardized x, chunked over rows."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(x), chunk):
        logits = model(x[start:start + chunk])
        yy = y[start:start + chunk]
        correct += int((logits.argmax(dim=1) == yy).sum())
        loss += float(F.cross_entropy(logits, yy, reduction="sum"))
    return correct / len(x), loss / len(x)
