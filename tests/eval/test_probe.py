"""Linear probe (the paper's protocol): train-set standardization, lr x wd grid search on a held-out split, AdamW with
warmup + cosine, best test accuracy over epochs."""

import math

import pytest
import torch

from fastenc.eval.probe import PAPER_LRS, PAPER_WDS, _lr_at, _stratified_holdout, fit_standardization, linear_probe

TOY = dict(lrs=(1e-3, 1e-2, 1e-1), wds=(0.0, 1e-3), epochs=12, warmup_epochs=2, search_epochs=3, batch_size=64)


def gaussian_classes(n_per_class, num_classes=5, dim=32, sep=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = sep * torch.randn(num_classes, dim, generator=g)
    def draw(n):
        y = torch.arange(num_classes).repeat_interleave(n)
        return centers[y] + torch.randn(len(y), dim, generator=g), y
    return draw(n_per_class), draw(n_per_class // 2)


def test_separable_classes_are_probed_accurately_and_the_result_is_consistent():
    (xtr, ytr), (xte, yte) = gaussian_classes(100)
    r = linear_probe(xtr, ytr, xte, yte, **TOY)
    assert r.best_accuracy >= 0.95
    assert len(r.curve) == TOY["epochs"] and r.final_accuracy == r.curve[-1]
    assert r.best_accuracy == max(r.curve) and r.curve[r.best_epoch - 1] == r.best_accuracy
    assert 1 <= r.best_epoch <= TOY["epochs"]
    assert len(r.search) == len(TOY["lrs"]) * len(TOY["wds"])
    assert {(row["lr"], row["weight_decay"]) for row in r.search} == {(a, b) for a in TOY["lrs"] for b in TOY["wds"]}
    assert all(0 <= row["holdout_accuracy"] <= 1 and row["holdout_loss"] > 0 for row in r.search)
    chosen = next(row for row in r.search if (row["lr"], row["weight_decay"]) == (r.lr, r.weight_decay))
    assert chosen["holdout_accuracy"] == max(row["holdout_accuracy"] for row in r.search)
    # same seed, same everything
    again = linear_probe(xtr, ytr, xte, yte, **TOY)
    assert again.curve == r.curve and again.search == r.search


def test_paper_defaults_run_the_full_grid():
    (xtr, ytr), (xte, yte) = gaussian_classes(40, num_classes=3, dim=16)
    r = linear_probe(xtr, ytr, xte, yte, epochs=6, warmup_epochs=2, search_epochs=2)  # paper grid and batch
    assert len(r.search) == len(PAPER_LRS) * len(PAPER_WDS) == 12
    assert r.lr in PAPER_LRS and r.weight_decay in PAPER_WDS and len(r.curve) == 6


def test_random_labels_give_chance():
    g = torch.Generator().manual_seed(1)
    xtr, xte = torch.randn(400, 32, generator=g), torch.randn(400, 32, generator=g)
    ytr, yte = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    r = linear_probe(xtr, ytr, xte, yte, **TOY)
    assert abs(r.final_accuracy - 0.25) < 0.12
    assert r.best_accuracy < 0.25 + 0.12


def test_standardization_uses_train_statistics():
    x = torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    mean, scale = fit_standardization(x)
    torch.testing.assert_close(mean, torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(scale, torch.tensor([math.sqrt(8 / 3), 1.0]))  # constant dim: centered only
    # Train: class 0 near x0 = -1, class 1 near +1. Test: only class 1. With the train statistics the test points stay
    # on the class-1 side; standardized with their own statistics they would straddle 0 and half would be wrong.
    g = torch.Generator().manual_seed(0)
    ytr = torch.arange(2).repeat(100)
    xtr = torch.stack([2.0 * ytr - 1, torch.zeros(200)], 1) + 0.1 * torch.randn(200, 2, generator=g)
    xte = torch.tensor([[1.0, 0.0]]) + 0.1 * torch.randn(100, 2, generator=g)
    r = linear_probe(xtr, ytr, xte, torch.ones(100, dtype=torch.long), **TOY)
    assert r.final_accuracy == 1.0


def test_probe_is_invariant_to_per_dimension_affine_maps():
    # standardization undoes any per-dimension scale and shift, which a raw probe at a fixed lr could not absorb
    (xtr, ytr), (xte, yte) = gaussian_classes(60, num_classes=4, dim=16)
    scale = torch.logspace(-3, 3, 16)
    shift = torch.linspace(-500, 500, 16)
    kw = dict(TOY, epochs=6, search_epochs=2)
    plain = linear_probe(xtr, ytr, xte, yte, **kw)
    warped = linear_probe(xtr * scale + shift, ytr, xte * scale + shift, yte, **kw)
    assert plain.best_accuracy >= 0.95
    assert (warped.lr, warped.weight_decay) == (plain.lr, plain.weight_decay)
    assert max(abs(a - b) for a, b in zip(plain.curve, warped.curve)) <= 0.02


def test_holdout_is_stratified_and_seeded():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20 + [3] * 1)
    fit, hold = _stratified_holdout(y, 4, 0.1, seed=0)
    assert torch.bincount(y[hold], minlength=4).tolist() == [5, 3, 2, 0]  # a singleton class keeps its sample
    assert sorted(torch.cat([fit, hold]).tolist()) == list(range(len(y)))
    assert torch.equal(_stratified_holdout(y, 4, 0.1, seed=0)[1], hold)
    assert not torch.equal(_stratified_holdout(y, 4, 0.1, seed=1)[1], hold)


def test_schedule_warms_up_then_decays():
    lrs = [_lr_at(s, 1.0, warmup_steps=4, total_steps=12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.1


def test_single_grid_point_skips_the_search():
    (xtr, ytr), (xte, yte) = gaussian_classes(10, num_classes=2, dim=4)
    r = linear_probe(xtr[:3], ytr[:3], xte, yte, lrs=(1e-2,), wds=(0.0,), epochs=2, warmup_epochs=0)
    assert r.search == [{"lr": 1e-2, "weight_decay": 0.0, "holdout_accuracy": None, "holdout_loss": None}]


def test_errors_say_what_to_fix():
    x, y = torch.randn(20, 8), torch.arange(4).repeat(5)
    with pytest.raises(ValueError, match="class-count mismatch: labels go up to 3 but num_classes=3"):
        linear_probe(x, y, x, y, num_classes=3)
    with pytest.raises(ValueError, match="feature widths differ: train_x has 8 dims, test_x 6"):
        linear_probe(x, y, x[:, :6], y)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="test_x has NaN/inf features in 1 of 20 rows"):
        linear_probe(x, y, bad, y)
    with pytest.raises(ValueError, match="empty train set"):
        linear_probe(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="negative labels"):
        linear_probe(x, y - 1, x, y)
    with pytest.raises(ValueError, match="integer class ids"):
        linear_probe(x, y.float(), x, y)
    with pytest.raises(ValueError, match="matching train_x's 20 rows"):
        linear_probe(x, y[:10], x, y)
    with pytest.raises(ValueError, match="too small for a held-out split"):
        linear_probe(x[:4], y[:4], x, y)
    with pytest.raises(ValueError, match="warmup_epochs"):
        linear_probe(x, y, x, y, epochs=5, warmup_epochs=6)
