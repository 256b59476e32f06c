"""torch.compile'd blocks (engine.compile) against the eager reference: same outputs and gradients."""

import copy

import torch

from fastenc.models import create_text_tower, create_vit
from fastenc.models.layers.block import compile_blocks


def _loss_and_grads(vit, txt, x, tokens, proj):
    loss = (vit(x) @ proj).square().mean() + (txt(tokens) @ proj).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in [*vit.named_parameters(), *txt.named_parameters()]}


def test_compiled_blocks_match_eager():
    vit = create_vit("vit_test", attn_impl="sdpa")
    txt = create_text_tower("text_test", vocab_size=50, output_dim=64, attn_impl="sdpa")
    vit_c, txt_c = copy.deepcopy(vit), copy.deepcopy(txt)
    assert compile_blocks(vit_c) == 2 and compile_blocks(txt_c) == 2
    x, tokens = torch.randn(3, 3, 32, 32), torch.randint(4, 50, (3, 16))
    proj = torch.randn(64, 8)  # a fixed random readout: LayerNorm'd features make square().sum() nearly constant
    want_loss, want = _loss_and_grads(vit, txt, x, tokens, proj)
    got_loss, got = _loss_and_grads(vit_c, txt_c, x, tokens, proj)
    # Inductor reorders fp32 reductions (LayerNorm, fused GELU): differences at fp32 rounding level.
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert vit_c.state_dict().keys() == vit.state_dict().keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-8,
                                   msg=lambda m: f"{name}: {m}")
