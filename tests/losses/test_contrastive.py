"""clip_loss / clip_loss_ref against an inline formula and open_clip's ClipLoss: values and all gradients."""

from functools import partial

import pytest
import torch

from fastenc.losses import clip_loss, clip_loss_ref
from tests.losses.helpers import BF16_U, fast_impls, rel_err, unit_features, value_and_grads

NAMES = ("loss", "d_image", "d_text", "d_logit_scale")


def clip_inline(img, txt, scale):
    """The textbook formula, written independently of fastenc: mean -log softmax of the diagonal, both ways."""
    z = scale * img @ txt.T
    diag = z.diagonal()
    return (-(diag - z.logsumexp(dim=1)).mean() - (diag - z.logsumexp(dim=0)).mean()) / 2


def clip_open_clip(img, txt, scale):
    return pytest.importorskip("open_clip.loss").ClipLoss()(img, txt, scale)


ORACLES = {"inline": clip_inline, "open_clip": clip_open_clip}
# "clip_loss": the default impl ("auto"); the rest name theirs.
CANDIDATES = {"clip_loss": clip_loss, "clip_loss_reference": partial(clip_loss, impl="reference"),
              "clip_loss_ref": clip_loss_ref,
              **{f"clip_loss_{impl}": partial(clip_loss, impl=impl) for impl in fast_impls()}}


@pytest.mark.parametrize("B", [1, 2, 13])
@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("oracle", ORACLES)
def test_fp32_matches_oracle(oracle, candidate, B):
    img, txt = unit_features(B, 20)  # D = 20: not a power of two
    scale = torch.tensor(14.3)  # exp(log(1 / 0.07)), open_clip's initial value
    got = value_and_grads(CANDIDATES[candidate], img, txt, scale)
    want = value_and_grads(ORACLES[oracle], img, txt, scale)
    # fp32: the implementations differ only in summation order, so errors are a few ulp (1.2e-7) of the logits
    # (|z| <= 14.3); measured <= 1e-6, the bound leaves room for other BLAS builds.
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_python_float_scale_matches_tensor_scale():
    img, txt = unit_features(13, 20)
    torch.testing.assert_close(clip_loss(img, txt, 14.3), clip_loss(img, txt, torch.tensor(14.3)))


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("scale", [14.3, 100.0])  # initial value and open_clip's clamp
@pytest.mark.parametrize("B", [1, 13])
def test_bf16_error_within_twice_plain_pytorch(B, scale, impl):
    """bf16 rounds the similarities to 8 significant bits (relative error u = 2^-8), which every bf16 implementation
    inherits in the softmax inputs (an error of up to scale * u per logit). Principle 3: ours, measured against fp32
    on the same bf16-rounded inputs, must be at most twice as far off as a plain all-bf16 PyTorch evaluation, with a
    floor of u (one bf16 rounding) for cases where the plain evaluation's roundings happen to cancel."""
    img, txt = unit_features(B, 20, torch.bfloat16)
    t = torch.tensor(scale)
    want = value_and_grads(clip_inline, img.float(), txt.float(), t)
    plain = value_and_grads(clip_inline, img, txt, t.bfloat16())
    got = value_and_grads(partial(clip_loss, impl=impl), img, txt, t)
    for name, g, p, w in zip(NAMES, got, plain, want):
        err, err_plain = rel_err(g, w), rel_err(p, w)
        assert err <= max(2 * err_plain, BF16_U), f"{name}: rel err {err:.2e} vs plain bf16 {err_plain:.2e}"


def test_bf16_output_dtypes():
    img, txt = unit_features(4, 20, torch.bfloat16)
    img.requires_grad_()
    loss = clip_loss(img, txt, torch.tensor(14.3))
    loss.backward()
    assert loss.dtype == torch.float32 and img.grad.dtype == torch.bfloat16
