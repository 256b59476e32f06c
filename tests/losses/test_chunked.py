"""impl="chunked" (clip_loss, siglip_loss) against the reference twins: value and every gradient, chunk sizes, odd shapes, bf16, and the
memory bound itself (nothing of size B x N is kept for backward)."""

import pytest
import torch
import torch.nn.functional as F

from fastenc.losses import clip_loss, siglip_loss
from fastenc.losses.chunked import clip_rows_chunked, siglip_block_chunked
from fastenc.losses.contrastive import _clip_rows_ref
from fastenc.losses.sigmoid import _siglip_block_ref
from tests.losses.helpers import BF16_U, rel_err, value_and_grads

NAMES = ("loss", "d_img_rows", "d_txt_rows", "d_img_cols", "d_txt_cols", "d_logit_scale")


def _inputs(B, N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, D, generator=g), dim=1).to(dtype) for n in (B, B, N, N)]


# (B, N, offset): one process (N = B, offset 0), B = 1, prime B, and a rank's rows inside a larger global batch.
SHAPES = [(1, 1, 0), (7, 7, 0), (13, 13, 0), (5, 13, 8), (4, 12, 4)]


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("B,N,offset", SHAPES)
@pytest.mark.parametrize("D", [20, 5])
def test_clip_rows_fp32_equal_reference(B, N, offset, D, chunk):
    ins = _inputs(B, N, D)
    scale = torch.tensor(14.3)
    want = value_and_grads(lambda *x: _clip_rows_ref(*x[:4], x[4], offset), *ins, scale)
    got = value_and_grads(lambda *x: clip_rows_chunked(*x[:4], x[4], offset, chunk=chunk), *ins, scale)
    # fp32: same terms, other summation order (chunked sums tiles); a few ulp of logits up to 14.3.
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("scale", [14.3, 100.0])
@pytest.mark.parametrize("chunk", [2, 64])
def test_clip_rows_bf16_error_within_twice_the_reference(scale, chunk):
    """Both run the similarity matmul in bf16; against fp32 on the same bf16-rounded inputs, chunked may be at most
    twice as far off as the bf16 reference (floor: one bf16 rounding)."""
    B, N, offset = 9, 18, 9
    ins = _inputs(B, N, 20, torch.bfloat16)
    t = torch.tensor(scale)
    exact = value_and_grads(lambda *x: _clip_rows_ref(*x[:4], x[4], offset), *[x.float() for x in ins], t)
    ref = value_and_grads(lambda *x: _clip_rows_ref(*x[:4], x[4], offset), *ins, t)
    got = value_and_grads(lambda *x: clip_rows_chunked(*x[:4], x[4], offset, chunk=chunk), *ins, t)
    for name, g, r, w in zip(NAMES, got, ref, exact):
        err, err_ref = rel_err(g, w), rel_err(r, w)
        assert err <= max(2 * err_ref, BF16_U), f"{name}: rel err {err:.2e} vs reference bf16 {err_ref:.2e}"


def test_bf16_gradients_keep_the_feature_dtype():
    img, txt, _, _ = _inputs(6, 6, 8, torch.bfloat16)
    img.requires_grad_()
    loss = clip_loss(img, txt, torch.tensor(14.3), impl="chunked")
    loss.backward()
    assert loss.dtype == torch.float32 and img.grad.dtype == torch.bfloat16


def test_public_clip_loss_chunked_equals_reference_with_scale_gradient():
    img, txt, _, _ = _inputs(11, 11, 16)
    t = torch.tensor(20.0)
    want = value_and_grads(lambda i, x, s: clip_loss(i, x, s, impl="reference"), img, txt, t)
    got = value_and_grads(lambda i, x, s: clip_loss(i, x, s, impl="chunked"), img, txt, t)
    for name, g, w in zip(("loss", "d_image", "d_text", "d_logit_scale"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_python_float_scale_and_frozen_scale():
    img, txt, _, _ = _inputs(5, 5, 8)
    torch.testing.assert_close(clip_loss(img, txt, 14.3, impl="chunked"),
                               clip_loss(img, txt, torch.tensor(14.3), impl="reference"))
    frozen = torch.tensor(14.3)  # no requires_grad: no gradient is computed or returned for it
    img = img.clone().requires_grad_()
    clip_loss(img, txt, frozen, impl="chunked").backward()
    assert img.grad is not None and frozen.grad is None


def test_bad_chunk_is_refused():
    img, txt, _, _ = _inputs(3, 3, 4)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        clip_rows_chunked(img, txt, img, txt, 10.0, 0, chunk=0)


def _largest_saved(fn, *inputs) -> int:
    """numel of the largest tensor autograd keeps for backward while building fn's graph."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*[x.clone().requires_grad_() for x in inputs])
    return max(sizes)


def test_no_b_by_n_tensor_is_kept_for_backward():
    B, D = 256, 8
    img, txt, _, _ = _inputs(B, B, D)
    scale = torch.tensor(14.3, requires_grad=True)
    ref = _largest_saved(lambda i, x: clip_loss(i, x, scale, impl="reference"), img, txt)
    chunked = _largest_saved(lambda i, x: clip_loss(i, x, scale, impl="chunked"), img, txt)
    assert ref >= B * B  # the reference keeps its logits / softmax (the check can fail)
    assert chunked == B * D  # only the features themselves (and O(B) row statistics)


# ----- SigLIP: one [B, M] block (M = B with positives on the diagonal; any M for a ring step's negatives) -----

SIGLIP_NAMES = ("loss", "d_img", "d_txt", "d_logit_scale", "d_logit_bias")


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("B,M,positives", [(1, 1, True), (7, 7, True), (13, 13, True), (5, 8, False), (1, 3, False)])
def test_siglip_block_fp32_equals_reference(B, M, positives, chunk):
    img, txt = _inputs(B, M, 20)[1:3]
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)  # SigLIP's init
    want = value_and_grads(lambda i, x, t, b: _siglip_block_ref(i, x, t, b, positives), img, txt, scale, bias)
    got = value_and_grads(lambda i, x, t, b: siglip_block_chunked(i, x, t, b, positives, chunk=chunk),
                          img, txt, scale, bias)
    for name, g, w in zip(SIGLIP_NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunk", [2, 64])
def test_siglip_bf16_error_within_twice_the_reference(chunk):
    img, txt = _inputs(9, 9, 20, torch.bfloat16)[1:3]
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    exact = value_and_grads(lambda i, x, s, c: siglip_loss(i, x, s, c, impl="reference"), img.float(), txt.float(),
                            t, b)
    ref = value_and_grads(lambda i, x, s, c: siglip_loss(i, x, s, c, impl="reference"), img, txt, t, b)
    got = value_and_grads(lambda i, x, s, c: siglip_block_chunked(i, x, s, c, True, chunk=chunk) / i.shape[0],
                          img, txt, t, b)
    for name, g, r, w in zip(SIGLIP_NAMES, got, ref, exact):
        err, err_ref = rel_err(g, w), rel_err(r, w)
        assert err <= max(2 * err_ref, BF16_U), f"{name}: rel err {err:.2e} vs reference bf16 {err_ref:.2e}"


def test_siglip_block_refuses_bad_arguments():
    img, txt = _inputs(3, 4, 4)[1:3]
    with pytest.raises(ValueError, match="must be square"):
        siglip_block_chunked(img, txt, 10.0, -10.0, True)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        siglip_block_chunked(img, img, 10.0, -10.0, True, chunk=0)


def test_siglip_no_b_by_b_tensor_is_kept_for_backward():
    B, D = 256, 8
    img, txt = _inputs(B, B, D)[1:3]
    t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    ref = _largest_saved(lambda i, x: siglip_loss(i, x, t, b, impl="reference"), img, txt)
    chunked = _largest_saved(lambda i, x: siglip_loss(i, x, t, b, impl="chunked"), img, txt)
    assert ref >= B * B
    assert chunked == B * D
