"""Whole objectives (ViT + text tower + projections + logit scale/bias + loss) under 2 gloo ranks: the data-parallel
gradient of EVERY parameter equals the single-process full-batch gradient.

The loss-level tests (tests/losses/test_distributed.py) check the collectives on a single Linear; this one checks
that the objectives call them correctly (normalization, scale clamp, bias, distributed detection) end to end.
"""

import os

import pytest
import torch
import torch.distributed as dist

from fastenc.config import load_config
from tests.gloo import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORLD, B = 2, 3  # local batch of 3 (odd); global batch 6


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from fastenc.datatools.synth import write_synthetic_shards
    from fastenc.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    write_synthetic_shards(str(root / "s"), 200, image_size=32, seed=1, samples_per_shard=200, progress=False)
    return train_tokenizer(str(root / "s"), str(root / "tok"), vocab_size=80)


def _build(kind, tokenizer_path):
    from fastenc.objectives import build_objective

    cfg = load_config(os.path.join(ROOT, f"configs/cpu/{kind}_tiny.yaml"),
                      ["model.name=vit_test", "objective.embed_dim=24", "objective.text.name=text_test",
                       f"objective.tokenizer={tokenizer_path}", "model.attn_impl=math"])
    torch.manual_seed(0)
    return build_objective(cfg)


def _batch(obj):
    g = torch.Generator().manual_seed(1)
    captions = ["a red star", "a photo of a ring", 'the word "moon" on a cross', "an image of a heart", "square",
                'a blue hexagon with the word "sun"']
    return {"image": torch.randn(WORLD * B, 3, 32, 32, generator=g), "text": obj.tokenizer(captions)}


def _grads(obj):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in obj.named_parameters()}


def _rank(rank, world, kind, tokenizer_path):
    obj = _build(kind, tokenizer_path)
    batch = _batch(obj)
    local = {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}
    loss, _ = obj(local)
    loss.backward()
    grads = _grads(obj)
    for g in grads.values():  # DeepSpeed's data-parallel reduction: sum over ranks, divide by world size
        dist.all_reduce(g)
        g /= world
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    return {"grads": grads, "loss": torch.stack(losses).mean()}


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_rank_gradients_equal_full_batch(kind, tokenizer_path, tmp_path):
    obj = _build(kind, tokenizer_path)
    loss, _ = obj(_batch(obj))  # no process group here: the plain full-batch loss
    loss.backward()
    want = _grads(obj)

    results = run_ranks(_rank, WORLD, tmp_path, kind, tokenizer_path)
    for got in results:
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        assert set(got["grads"]) == set(want)
        for name, g in want.items():
            # fp32 throughout; the only difference is summation order across ranks, so the absolute error scales
            # with the tensor's largest entry (elements near zero come from cancellation and have no relative
            # precision of their own).
            atol = 1e-5 * g.abs().max().item() + 1e-8
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
        assert any(g.abs().sum() > 0 for n, g in want.items() if n.startswith("encoder.blocks"))
