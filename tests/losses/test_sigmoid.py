"""siglip_loss / siglip_loss_ref against an inline formula and open_clip's SigLipLoss: values and all gradients."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from fastenc.losses import siglip_loss, siglip_loss_ref
from tests.losses.helpers import BF16_U, fast_impls, rel_err, unit_features, value_and_grads

NAMES = ("loss", "d_image", "d_text", "d_logit_scale", "d_logit_bias")


def siglip_inline(img, txt, scale, bias):
    """The textbook formula, written independently of fastenc: softplus(-z) for positives, softplus(z) otherwise."""
    z = scale * img @ txt.T + bias
    eye = torch.eye(z.shape[0], dtype=torch.bool)
    return torch.where(eye, F.softplus(-z), F.softplus(z)).sum() / z.shape[0]


def siglip_open_clip(img, txt, scale, bias):
    return pytest.importorskip("open_clip.loss").SigLipLoss()(img, txt, scale, bias)


ORACLES = {"inline": siglip_inline, "open_clip": siglip_open_clip}
CANDIDATES = {
    "siglip_loss": siglip_loss,  # the default impl ("auto")
    "siglip_loss_reference": partial(siglip_loss, impl="reference"),
    "siglip_loss_ref": siglip_loss_ref,
    **{f"siglip_loss_{impl}": partial(siglip_loss, impl=impl) for impl in fast_impls()},
}


@pytest.mark.parametrize("B", [1, 2, 13])
@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("oracle", ORACLES)
def test_fp32_matches_oracle(oracle, candidate, B):
    img, txt = unit_features(B, 20)  # D = 20: not a power of two
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)  # SigLIP's initial values
    got = value_and_grads(CANDIDATES[candidate], img, txt, scale, bias)
    want = value_and_grads(ORACLES[oracle], img, txt, scale, bias)
    # fp32: only summation order differs, so errors are a few ulp (1.2e-7) of the logits (|z| <= 20); measured
    # <= 1e-6, the bound leaves room for other BLAS builds.
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_python_float_scale_and_bias():
    img, txt = unit_features(13, 20)
    want = siglip_loss(img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    torch.testing.assert_close(siglip_loss(img, txt, 10.0, -10.0), want)


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("scale_bias", [(10.0, -10.0), (1.0, 0.0)])  # initial values; a soft, unbiased setting
@pytest.mark.parametrize("B", [1, 13])
def test_bf16_error_within_twice_plain_pytorch(B, scale_bias, impl):
    """bf16 rounds the similarities to 8 significant bits (relative error u = 2^-8), an error every bf16
    implementation inherits in z. Principle 3: ours, measured against fp32 on the same bf16-rounded inputs, must be
    at most twice as far off as a plain all-bf16 PyTorch evaluation, with a floor of u (one bf16 rounding) for cases
    where the plain evaluation's roundings happen to cancel."""
    img, txt = unit_features(B, 20, torch.bfloat16)
    t, b = (torch.tensor(v) for v in scale_bias)
    want = value_and_grads(siglip_inline, img.float(), txt.float(), t, b)
    plain = value_and_grads(siglip_inline, img, txt, t.bfloat16(), b.bfloat16())
    got = value_and_grads(partial(siglip_loss, impl=impl), img, txt, t, b)
    for name, g, p, w in zip(NAMES, got, plain, want):
        err, err_plain = rel_err(g, w), rel_err(p, w)
        assert err <= max(2 * err_plain, BF16_U), f"{name}: rel err {err:.2e} vs plain bf16 {err_plain:.2e}"
