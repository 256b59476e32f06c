"""siglip_block_triton (fastenc/kernels/sigmoid.py) against `_siglip_block_ref`: value and the gradients of both
features, t and b; positives and all-negative ring blocks, non-square blocks, odd sizes and tiles, both backward
modes, bf16, and that no B x M tensor is saved or created."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need triton (it ships with the CUDA build of torch)")

from fastenc.kernels.sigmoid import siglip_block_ref, siglip_block_triton  # noqa: E402
from tests.kernels.tolerances import (  # noqa: E402
    assert_fp32_kernel,
    assert_fp32_matches_oracle,
    float64_oracle,
    similarity_logit_range,
)
from tests.losses.helpers import BF16_U, rel_err, value_and_grads  # noqa: E402

NAMES = ("loss", "d_img", "d_txt", "d_logit_scale", "d_logit_bias")


def _features(B, M, D, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, D, generator=g), dim=1).to(device=device, dtype=dtype) for n in (B, M)]


def _scalars(device, scale=10.0, bias=-10.0):  # SigLIP's init
    return torch.tensor(scale, device=device), torch.tensor(bias, device=device)


def _siglip_terms(img, txt, t, b, positives):
    """float64 magnitudes T (tests/kernels/tolerances.py) of the terms entering each output, in value_and_grads'
    order (loss, d_img, d_txt, d_t, d_b), for z = t x_i . y_j + b, label l = +1 on the diagonal iff positives.

    The kernel's dL/dz = sigmoid(z) - [l = +1]: terms A = sigmoid(z) + [l = +1]; d img = t A |txt|, d txt =
    t A^T |img|, dt = sum A |x . y|, db = sum A. The loss sums softplus(-l z); T adds its gradient mass sigmoid(-l z),
    through which each logit's rounding reaches it. At SigLIP's init an all-negative block is made of terms ~1e-4:
    there the bound is ~2e-5 of the loss, and a plain log(1 + x) in place of the kernel's log1p, ~3e-5 off, fails
    it (1.5x) and the comparison with plain PyTorch, whose logsigmoid is accurate (6x; both checked by swapping it
    in)."""
    img, txt, t, b = (x.detach().double() for x in (img, txt, torch.as_tensor(t), torch.as_tensor(b)))
    s = img @ txt.T
    z = t * s + b
    pos = torch.zeros_like(z)
    if positives:
        pos.fill_diagonal_(1.0)
    lz = (2 * pos - 1) * z
    a = torch.sigmoid(z) + pos
    return [(F.softplus(-lz) + torch.sigmoid(-lz)).sum(), t * a @ txt.abs(), t * a.T @ img.abs(), (a * s.abs()).sum(),
            a.sum()]


def _check_fp32(img, txt, t, b, positives, **kw):
    """fp32 siglip_block_triton vs siglip_block_ref in float64, bounds derived from fp32 rounding (tests/kernels/
    tolerances.py), plain fp32 siglip_block_ref as the baseline. The kernel reorders the same terms (tiles, D
    slices, per-block partials) and, compiled, uses fast exp / log; its sigmoid(z) - 1 for a positive cancels."""
    assert_fp32_matches_oracle(NAMES, lambda i, x, s, c: siglip_block_triton(i, x, s, c, positives, **kw),
                               lambda i, x, s, c: siglip_block_ref(i, x, s, c, positives), (img, txt, t, b),
                               _siglip_terms(img, txt, t, b, positives), similarity_logit_range(t, img, txt, b))


# (B, M, positives, D, block_m, block_n, block_d, deterministic)
CASES = [
    (1, 1, True, 5, 16, 16, 16, True),
    (13, 13, True, 20, 16, 16, 16, True),
    (13, 13, True, 20, 16, 16, 16, False),
    (37, 37, True, 40, 32, 16, 16, True),
    (5, 17, False, 40, 16, 16, 32, True),   # a ring step's all-negative block, non-square
    (20, 7, False, 20, 16, 32, 16, False),  # more rows than columns
    (1, 3, False, 20, 64, 64, 64, True),    # B = 1, default tiles (shrunk)
]


@pytest.mark.parametrize("B,M,positives,D,bm,bn,bd,deterministic", CASES)
def test_fp32_equals_reference(B, M, positives, D, bm, bn, bd, deterministic, device):
    img, txt = _features(B, M, D, device)
    t, b = _scalars(device)
    _check_fp32(img, txt, t, b, positives, block_m=bm, block_n=bn, block_d=bd, deterministic=deterministic)


@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (100.0, 5.0)])
def test_fp32_other_scales(scale, bias, device):
    """Beyond the init: z of both signs, and |z| up to ~100 (saturated sigmoids, softplus ~ |z|). At t = 100 a
    gradient element sums terms of size ~t / sqrt(D) that cancel to ~1: single elements legitimately differ by ~3e-5
    relative between two fp32 summation orders; the derived bound follows T and Z = 105, not the result."""
    img, txt = _features(13, 13, 20, device)
    t, b = _scalars(device, scale, bias)
    _check_fp32(img, txt, t, b, True, block_m=16, block_n=16, block_d=16)


def test_python_float_scale_and_bias(device):
    img, txt = _features(6, 6, 20, device)
    img = img.clone().requires_grad_()
    loss = siglip_block_triton(img, txt, 10.0, -10.0, True)
    assert_fp32_kernel("loss", loss, siglip_block_ref(img, txt, 10.0, -10.0, True),
                       float64_oracle(siglip_block_ref)(img, txt, 10.0, -10.0, True),
                       _siglip_terms(img, txt, 10.0, -10.0, True)[0], similarity_logit_range(10.0, img, txt, -10.0))
    loss.backward()
    assert img.grad is not None


def _plain_bf16(i, x, t, b):
    """-sum log sigmoid(l z) evaluated entirely in bf16 by plain PyTorch (matmul, scale, bias, logsigmoid)."""
    z = t * (i @ x.T) + b
    labels = 2 * torch.eye(z.shape[0], device=z.device, dtype=z.dtype) - 1
    return -F.logsigmoid(labels * z).sum()


@pytest.mark.parametrize("deterministic", [True, False])
def test_bf16_error_within_twice_plain_pytorch(deterministic, device):
    """Against fp32 on the same bf16-rounded inputs: at most twice plain all-bf16 PyTorch's error, floor u = 2^-8."""
    img, txt = _features(13, 13, 20, device, torch.bfloat16)
    t, b = _scalars(device)
    want = value_and_grads(lambda i, x, s, c: siglip_block_ref(i, x, s, c, True), img.float(), txt.float(), t, b)
    plain = value_and_grads(_plain_bf16, img, txt, t.bfloat16(), b.bfloat16())
    got = value_and_grads(lambda i, x, s, c: siglip_block_triton(i, x, s, c, True, block_m=16, block_n=16,
                                                                 block_d=16, deterministic=deterministic),
                          img, txt, t, b)
    for name, g, p, w in zip(NAMES, got, plain, want):
        err, err_plain = rel_err(g, w), rel_err(p, w)
        assert err <= max(2 * err_plain, BF16_U), f"{name}: rel err {err:.2e} vs plain bf16 {err_plain:.2e}"


def test_bf16_dtypes(device):
    img, txt = _features(5, 5, 20, device, torch.bfloat16)
    txt.requires_grad_()
    loss = siglip_block_triton(img, txt, 10.0, -10.0, True)
    loss.backward()
    assert loss.dtype == torch.float32 and txt.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("positives,M", [(True, 64), (False, 96)])
def test_no_b_by_m_tensor_is_saved_or_created(positives, M, device, memory_probe):
    """Forward saves only the inputs; no op creates a B x M tensor. The reference does both: the check can fail."""
    B, D = 64, 8
    img, txt = _features(B, M, D, device)
    t, b = _scalars(device)
    fn = lambda i, x, s, c: siglip_block_triton(i, x, s, c, positives, block_m=16, block_n=16, block_d=16)  # noqa
    saved, created = memory_probe(fn, img, txt, t, b)
    assert saved == max(B, M) * D and created < B * M
    saved_ref, created_ref = memory_probe(lambda i, x, s, c: siglip_block_ref(i, x, s, c, positives), img, txt, t, b)
    assert saved_ref >= B * M and created_ref >= B * M


def test_bad_arguments_are_refused(device):
    img, txt = _features(3, 4, 20, device)
    with pytest.raises(ValueError, match="must be square"):
        siglip_block_triton(img, txt, 10.0, -10.0, True)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        siglip_block_triton(img, txt, 10.0, -10.0, False, block_n=48)
    with pytest.raises(ValueError, match="expected \\[B, D\\] and \\[M, D\\]"):
        siglip_block_triton(img, txt[:, :5], 10.0, -10.0, False)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("positives,M", [(True, 1000), (False, 777)])
def test_gpu_at_scale(positives, M, deterministic):
    B, D = 1000, 512
    img, txt = _features(B, M, D, "cuda")
    t, b = _scalars("cuda")
    ref = lambda i, x, s, c: siglip_block_ref(i, x, s, c, positives)  # noqa: E731
    fn = lambda i, x, s, c: siglip_block_triton(i, x, s, c, positives, deterministic=deterministic)  # noqa: E731
    # ~1000-term sums in another order and the compiled fast exp / log: the derived bounds follow T.
    _check_fp32(img, txt, t, b, positives, deterministic=deterministic)
    img16, txt16 = img.bfloat16(), txt.bfloat16()
    if positives:
        want = value_and_grads(ref, img16.float(), txt16.float(), t, b)
        plain = value_and_grads(_plain_bf16, img16, txt16, t.bfloat16(), b.bfloat16())
        got = value_and_grads(fn, img16, txt16, t, b)
        for name, g, p, w in zip(NAMES, got, plain, want):
            err, err_plain = rel_err(g, w), rel_err(p, w)
            assert err <= max(2 * err_plain, BF16_U), f"{name}: rel err {err:.2e} vs plain bf16 {err_plain:.2e}"
