"""clip_rows_triton (fastenc/kernels/contrastive.py) against `_clip_rows_ref`: value and every gradient, fp32 and
bf16, odd sizes and tile sizes, both backward modes (second pass / atomics), the shared-tile and the distributed-style
call, and the memory bound (no B x N tensor is saved or even created)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need triton (it ships with the CUDA build of torch)")

from fastenc.kernels import contrastive as kernel_module  # noqa: E402
from fastenc.kernels.contrastive import clip_rows_ref, clip_rows_triton  # noqa: E402
from tests.kernels.tolerances import (  # noqa: E402
    assert_fp32_kernel,
    assert_fp32_matches_oracle,
    float64_oracle,
    fp32_bound,
    similarity_logit_range,
    value_and_grads_keep_dtype,
)
from tests.losses.helpers import BF16_U, rel_err, value_and_grads  # noqa: E402

SHARED_NAMES = ("loss", "d_img", "d_txt", "d_logit_scale")
ROWS_NAMES = ("loss", "d_img_rows", "d_txt_rows", "d_img_cols", "d_txt_cols", "d_logit_scale")


def _features(n_rows, D, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, D, generator=g), dim=1).to(device=device, dtype=dtype) for n in n_rows]


def _shared(fn, **kw):
    """One process: rows and columns are the same tensor objects (what clip_loss passes), so autograd sums the row
    and column gradients of each feature matrix, for the reference as for the kernel."""
    return lambda img, txt, t: fn(img, txt, img, txt, t, 0, **kw)


def _rows(fn, offset, **kw):
    return lambda i, x, iN, xN, t: fn(i, x, iN, xN, t, offset, **kw)


def _clip_terms(img, txt, img_N, txt_N, t, offset, shared=False):
    """float64 magnitudes T (tests/kernels/tolerances.py) of the terms entering each output, in value_and_grads'
    order: shared (rows and columns the same objects) (loss, d_img, d_txt, d_t), else (loss, d_img_rows,
    d_txt_rows, d_img_cols, d_txt_cols, d_t).

    Per direction (rows a against columns b, z = t a_i . b_j, w = 1 / (2B)): dL/dz_ij = w (P_ij - [j = offset + i]),
    whose terms weigh A_ij = w (P_ij + [j = offset + i]) (the shared tile adds both directions' A, its column
    softmax included, in one tile); d a_i = t sum_j dL/dz_ij b_j has terms t A |b|, d b_j likewise t A^T |a|,
    dt = sum dL/dz * (a . b) has A |a . b|. The value sums w (lse_i - z_i,pos) per row: T = w (|lse| + |z_pos| + 2),
    the 2 being the gradient mass sum_j |dL/dz_ij| / w that carries each logit's rounding into it."""
    img, txt, img_N, txt_N, t = (x.detach().double() for x in (img, txt, img_N, txt_N, t))
    B, N = img.shape[0], img_N.shape[0]
    w = 1.0 / (2 * B)
    pos = torch.zeros(B, N, dtype=torch.float64, device=img.device)
    pos[torch.arange(B), torch.arange(offset, offset + B)] = 1.0
    s_i, s_t = img @ txt_N.T, txt @ img_N.T  # image rows against text columns, text rows against image columns
    loss, grads = 0.0, []
    for s in (s_i, s_t):
        z = t * s
        a = w * (z.softmax(1) + pos)
        loss = loss + w * (z.logsumexp(1).abs() + (z * pos).sum(1).abs() + 2).sum()
        grads.append((a, s))
    (a_i, s_i), (a_t, s_t) = grads
    d_img_rows, d_txt_cols = t * a_i @ txt_N.abs(), t * a_i.T @ img.abs()
    d_txt_rows, d_img_cols = t * a_t @ img_N.abs(), t * a_t.T @ txt.abs()
    d_t = (a_i * s_i.abs()).sum() + (a_t * s_t.abs()).sum()
    if shared:
        return [loss, d_img_rows + d_img_cols, d_txt_rows + d_txt_cols, d_t]
    return [loss, d_img_rows, d_txt_rows, d_img_cols, d_txt_cols, d_t]


def _check_shared_fp32(img, txt, t, **kw):
    """fp32 shared-tile kernel vs clip_rows_ref in float64, bounds derived from fp32 rounding (tests/kernels/
    tolerances.py); plain fp32 clip_rows_ref is the baseline. The kernel reorders the same terms (tiles, D slices,
    online LSE, partial sums) and, compiled, uses fast exp / log and fused multiply-adds."""
    assert_fp32_matches_oracle(SHARED_NAMES, _shared(clip_rows_triton, **kw), _shared(clip_rows_ref), (img, txt, t),
                               _clip_terms(img, txt, img, txt, t, 0, shared=True),
                               similarity_logit_range(t, img, txt))


# (B, D, block_m, block_n, block_d, deterministic): B = 1, primes (13, 37: partial row / column tiles), D not a power
# of two (20, 40; with block_d 16 the feature loop takes 2 or 3 slices), several tile shapes, both backward modes.
SHARED_CASES = [
    (1, 5, 16, 16, 16, True),
    (13, 20, 16, 16, 16, True),
    (13, 20, 16, 16, 16, False),
    (37, 40, 16, 32, 16, True),
    (37, 40, 32, 16, 64, False),
    (7, 20, 64, 64, 64, True),  # defaults, shrunk to the padded extents
]


@pytest.mark.parametrize("B,D,bm,bn,bd,deterministic", SHARED_CASES)
def test_shared_tile_fp32_equals_reference(B, D, bm, bn, bd, deterministic, device):
    img, txt = _features((B, B), D, device)
    t = torch.tensor(14.3, device=device)
    _check_shared_fp32(img, txt, t, block_m=bm, block_n=bn, block_d=bd, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
def test_shared_tile_fp32_at_the_clamped_scale(deterministic, device):
    img, txt = _features((13, 13), 20, device)
    t = torch.tensor(100.0, device=device)  # open_clip's clamp: the sharpest softmax, Z = 100
    _check_shared_fp32(img, txt, t, block_m=16, block_n=16, block_d=16, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
def test_single_pair_loss_and_gradients_are_zero(deterministic, device):
    """B = 1: one logit per softmax, so each probability is exactly 1, both CE terms are 0 and every gradient is 0
    (dL/dz = w (1 + 1 - 2)). The references return exactly 0, in float64 and in plain fp32 (a single logit's z - lse
    is exactly 0); the kernel may be off by the rounding of the logit it recomputes (compiled, t * s - max can become
    one fused multiply-add), within the derived bound C eps (1 + Z) T: for d_img, T = t w (1 + 1 + 2) |y| = 2 t |y|."""
    img, txt = _features((1, 1), 5, device)
    t = torch.tensor(14.3, device=device)
    fn = _shared(clip_rows_triton, block_m=16, block_n=16, block_d=16, deterministic=deterministic)
    got = value_and_grads_keep_dtype(fn, img, txt, t)
    want = value_and_grads_keep_dtype(float64_oracle(_shared(clip_rows_ref)), img, txt, t)
    plain = value_and_grads_keep_dtype(_shared(clip_rows_ref), img, txt, t)
    terms = _clip_terms(img, txt, img, txt, t, 0, shared=True)
    torch.testing.assert_close(terms[1], 2 * t.double() * txt.double().abs(), rtol=1e-12, atol=0)
    Z = similarity_logit_range(t, img, txt)
    for name, g, p, w, T in zip(SHARED_NAMES, got, plain, want, terms):
        assert torch.count_nonzero(w) == 0 and torch.count_nonzero(p) == 0, f"{name}: {w} (float64), {p} (fp32)"
        bound = fp32_bound(T, Z)
        assert (g.double().abs() <= bound).all(), f"{name}: kernel {g} is not 0 within {bound}"
        assert (bound < 1e-4 * T).all()  # tiny next to the terms: a 1e-3 error of any one of them fails


# Distributed-style calls: B local rows against N columns (all ranks' features) with positives at offset + i.
ROWS_CASES = [
    (5, 15, 5, 20, True),   # N = 3B, the second rank
    (5, 15, 5, 40, False),
    (1, 3, 1, 20, True),    # B = 1
    (13, 39, 13, 20, False),  # prime B, N = 3B
    (13, 39, 26, 40, True),   # the last rank
    (4, 12, 0, 20, True),     # the first rank
    (6, 6, 0, 20, True),      # N = B with distinct tensors: the general path, not the shared tile
]


@pytest.mark.parametrize("B,N,offset,D,deterministic", ROWS_CASES)
def test_distributed_rows_fp32_equal_reference(B, N, offset, D, deterministic, device):
    feats = _features((B, B, N, N), D, device)
    t = torch.tensor(14.3, device=device)
    fn = _rows(clip_rows_triton, offset, block_m=16, block_n=16, block_d=16, deterministic=deterministic)
    assert_fp32_matches_oracle(ROWS_NAMES, fn, _rows(clip_rows_ref, offset), (*feats, t),
                               _clip_terms(*feats, t, offset), similarity_logit_range(t, feats[0], feats[1]))


def test_shared_tile_path_is_taken_only_for_the_same_objects(device, monkeypatch):
    calls = []
    for name in ("_ClipSharedTile", "_ClipRows"):
        cls = getattr(kernel_module, name)
        monkeypatch.setattr(cls, "apply", (lambda f, n: lambda *a: calls.append(n) or f(*a))(cls.apply, name))
    img, txt = _features((6, 6), 20, device)
    clip_rows_triton(img, txt, img, txt, 14.3, 0)
    clip_rows_triton(img, txt, img.clone(), txt.clone(), 14.3, 0)
    assert calls == ["_ClipSharedTile", "_ClipRows"]


def test_python_float_scale_and_frozen_scale(device):
    img, txt = _features((9, 9), 20, device)
    t = torch.tensor(14.3, device=device)
    assert_fp32_kernel("loss", clip_rows_triton(img, txt, img, txt, 14.3, 0), clip_rows_ref(img, txt, img, txt, t, 0),
                       float64_oracle(clip_rows_ref)(img, txt, img, txt, t, 0),
                       _clip_terms(img, txt, img, txt, t, 0, shared=True)[0], similarity_logit_range(t, img, txt))
    frozen = torch.tensor(14.3, device=device)  # no requires_grad: nothing computed or returned for it
    img = img.clone().requires_grad_()
    clip_rows_triton(img, txt, img, txt, frozen, 0).backward()
    assert img.grad is not None and frozen.grad is None


def test_only_the_scale_requires_grad(device):
    """needs_input_grad paths: no feature gradient is wanted, only dL/dt."""
    img, txt = _features((11, 11), 20, device)
    for shared in (True, False):
        cols = (img, txt) if shared else (img.clone(), txt.clone())
        t1 = torch.tensor(14.3, device=device, requires_grad=True)
        t2 = torch.tensor(14.3, device=device, requires_grad=True)
        t64 = t1.detach().double().requires_grad_()  # the oracle's own leaf: its gradient stays float64
        clip_rows_ref(img, txt, *cols, t1, 0).backward()
        clip_rows_triton(img, txt, *cols, t2, 0).backward()
        float64_oracle(clip_rows_ref)(img, txt, *cols, t64, 0).backward()
        assert img.grad is None and txt.grad is None
        assert_fp32_kernel("d_logit_scale", t2.grad, t1.grad, t64.grad, _clip_terms(img, txt, *cols, t1, 0)[-1],
                           similarity_logit_range(t1, img, txt))


def test_column_slices_of_a_gathered_matrix(device):
    """clip_loss(distributed=True) passes img_ND / txt_ND as column slices of one [N, 2D] gather (row stride 2D)."""
    B, N, D, offset = 4, 12, 20, 8
    img, txt, both = _features((B, B, N), 2 * D, device)
    img, txt = img[:, :D].contiguous(), txt[:, :D].contiguous()
    fn = lambda i, x, b2, t: clip_rows_triton(i, x, b2[:, :D], b2[:, D:], t, offset, block_d=16)  # noqa: E731
    ref = lambda i, x, b2, t: clip_rows_ref(i, x, b2[:, :D], b2[:, D:], t, offset)  # noqa: E731
    t = torch.tensor(14.3, device=device)
    loss, d_img, d_txt, d_img_cols, d_txt_cols, d_t = _clip_terms(img, txt, both[:, :D], both[:, D:], t, offset)
    assert_fp32_matches_oracle(("loss", "d_img", "d_txt", "d_both", "d_t"), fn, ref, (img, txt, both, t),
                               (loss, d_img, d_txt, torch.cat([d_img_cols, d_txt_cols], dim=1), d_t),
                               similarity_logit_range(t, img, both))


# ----- bf16 -----


def _rows_plain_bf16(i, x, iN, xN, t, offset):
    """The formula evaluated entirely in bf16 by plain PyTorch (matmul, scale, logsumexp): the baseline error."""
    labels = torch.arange(offset, offset + i.shape[0], device=i.device)
    rows = torch.arange(i.shape[0], device=i.device)
    z_img, z_txt = t * (i @ xN.T), t * (x @ iN.T)
    ce_img = (z_img.logsumexp(1) - z_img[rows, labels]).mean()
    ce_txt = (z_txt.logsumexp(1) - z_txt[rows, labels]).mean()
    return (ce_img + ce_txt) / 2


@pytest.mark.parametrize("scale", [14.3, 100.0])
@pytest.mark.parametrize("deterministic", [True, False])
def test_shared_tile_bf16_error_within_twice_plain_pytorch(scale, deterministic, device):
    """Against an fp32 evaluation on the same bf16-rounded inputs, the kernel (bf16 tl.dot, fp32 accumulation and
    softmax, dL/ds rounded to bf16 for the gradient matmuls, gradients rounded once) must be at most twice as far
    off as plain all-bf16 PyTorch, with a floor of one bf16 rounding u = 2^-8 (principle 3). Under the interpreter
    this runs the EMULATE_BF16 path (module docstring), on CUDA the real bf16 MMA."""
    img, txt = _features((13, 13), 20, device, torch.bfloat16)
    t = torch.tensor(scale, device=device)
    want = value_and_grads(_shared(clip_rows_ref), img.float(), txt.float(), t)
    plain = value_and_grads(_shared(_rows_plain_bf16), img, txt, t.bfloat16())
    got = value_and_grads(_shared(clip_rows_triton, block_m=16, block_n=16, block_d=16,
                                  deterministic=deterministic), img, txt, t)
    for name, g, p, w in zip(SHARED_NAMES, got, plain, want):
        err, err_plain = rel_err(g, w), rel_err(p, w)
        assert err <= max(2 * err_plain, BF16_U), f"{name}: rel err {err:.2e} vs plain bf16 {err_plain:.2e}"


@pytest.mark.parametrize("deterministic", [True, False])
def test_distributed_rows_bf16_error_within_twice_plain_pytorch(deterministic, device):
    B, N, offset = 6, 18, 6
    feats = _features((B, B, N, N), 20, device, torch.bfloat16)
    t = torch.tensor(14.3, device=device)
    want = value_and_grads(_rows(clip_rows_ref, offset), *[f.float() for f in feats], t)
    plain = value_and_grads(_rows(_rows_plain_bf16, offset), *feats, t.bfloat16())
    got = value_and_grads(_rows(clip_rows_triton, offset, block_m=16, block_n=16, block_d=16,
                                deterministic=deterministic), *feats, t)
    for name, g, p, w in zip(ROWS_NAMES, got, plain, want):
        err, err_plain = rel_err(g, w), rel_err(p, w)
        assert err <= max(2 * err_plain, BF16_U), f"{name}: rel err {err:.2e} vs plain bf16 {err_plain:.2e}"


def test_bf16_dtypes(device):
    img, txt = _features((5, 5), 20, device, torch.bfloat16)
    img.requires_grad_()
    loss = clip_rows_triton(img, txt, img, txt, 14.3, 0)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.shape == () and img.grad.dtype == torch.bfloat16


def test_emulated_bf16_rounding_is_round_to_nearest_even(device):
    """The interpreter's stand-in for the fp32 -> bf16 cast (integer RTNE on the bits) against torch's cast."""
    if not kernel_module._INTERPRETED:
        pytest.skip("compiled kernels cast with the hardware's RTNE; the emulation only runs in the interpreter")
    import triton
    import triton.language as tl

    @triton.jit
    def round_kernel(x_ptr, y_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(y_ptr + r, kernel_module._round_to_operand(tl.load(x_ptr + r), tl.bfloat16, True))

    # Ties (low half exactly 0x8000, both parities), values whose rounding carries into the exponent, random ones.
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3FFFFFFF, 0x3F7FFF80, 0xBF808001, 0x3F807FFF], dtype=torch.int64)
    x = torch.cat([bits.to(torch.int32).view(torch.float32), torch.randn(4090) * 10])
    y = torch.empty_like(x)
    round_kernel[(1,)](x, y, N=4096)
    assert torch.equal(y, x.bfloat16().float())


# ----- memory: no B x N tensor -----


def test_no_b_by_n_tensor_is_saved_or_created(device, memory_probe):
    """Forward saves only the features and O(B) statistics; no op in forward or backward creates a B x N tensor
    (the [ceil(B / BM), N] column partials are the largest). The reference does both: the check can fail."""
    B, D = 64, 8
    img, txt = _features((B, B), D, device)
    t = torch.tensor(14.3, device=device)
    saved, created = memory_probe(_shared(clip_rows_triton, block_m=16, block_n=16, block_d=16), img, txt, t)
    assert saved == B * D and created < B * B
    saved_ref, created_ref = memory_probe(_shared(clip_rows_ref), img, txt, t)
    assert saved_ref >= B * B and created_ref >= B * B


@pytest.mark.parametrize("deterministic", [True, False])
def test_distributed_rows_no_b_by_n_tensor(deterministic, device, memory_probe):
    B, N, D = 32, 96, 4
    feats = _features((B, B, N, N), D, device)
    t = torch.tensor(14.3, device=device)
    saved, created = memory_probe(_rows(clip_rows_triton, B, block_m=16, block_n=16, block_d=16,
                                        deterministic=deterministic), *feats, t)
    assert saved == N * D and created < B * N
    saved_ref, created_ref = memory_probe(_rows(clip_rows_ref, B), *feats, t)
    assert saved_ref >= B * N and created_ref >= B * N


# ----- argument errors -----


def test_bad_arguments_are_refused(device):
    img, txt = _features((4, 4), 20, device)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        clip_rows_triton(img, txt, img, txt, 10.0, 0, block_m=24)
    with pytest.raises(ValueError, match="block_d must be a power of two >= 16"):
        clip_rows_triton(img, txt, img, txt, 10.0, 0, block_d=8)
    with pytest.raises(ValueError, match="offset 2 puts the B=4 positives outside"):
        clip_rows_triton(img, txt, img.clone(), txt.clone(), 10.0, 2)
    with pytest.raises(ValueError, match="must be one of"):
        clip_rows_triton(img.half(), txt.half(), img.half(), txt.half(), 10.0, 0)
    with pytest.raises(ValueError, match="expected rows"):
        clip_rows_triton(img, txt[:3], img, txt, 10.0, 0)
    with pytest.raises(ValueError, match="expected rows"):
        clip_rows_triton(img[0], txt[0], img, txt, 10.0, 0)


# ----- GPU: the compiled kernels at a realistic shape -----

# fp32 at scale: the same derived bounds (tests/kernels/tolerances.py), now with sums over ~1000 columns and 512
# features in another order and the compiled fast exp / log.


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_fp32_and_bf16_at_scale(deterministic):
    B, D = 1000, 512  # not a multiple of the 64 tiles
    img, txt = _features((B, B), D, "cuda")
    t = torch.tensor(14.3, device="cuda")
    _check_shared_fp32(img, txt, t, deterministic=deterministic)
    img16, txt16 = img.bfloat16(), txt.bfloat16()
    want = value_and_grads(_shared(clip_rows_ref), img16.float(), txt16.float(), t)
    plain = value_and_grads(_shared(_rows_plain_bf16), img16, txt16, t.bfloat16())
    got = value_and_grads(_shared(clip_rows_triton, deterministic=deterministic), img16, txt16, t)
    for name, g, p, w in zip(SHARED_NAMES, got, plain, want):
        err, err_plain = rel_err(g, w), rel_err(p, w)
        assert err <= max(2 * err_plain, BF16_U), f"{name}: rel err {err:.2e} vs plain bf16 {err_plain:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_distributed_rows_at_scale(deterministic):
    B, N, D = 333, 999, 256
    feats = _features((B, B, N, N), D, "cuda")
    t = torch.tensor(14.3, device="cuda")
    assert_fp32_matches_oracle(ROWS_NAMES, _rows(clip_rows_triton, 2 * B, deterministic=deterministic),
                               _rows(clip_rows_ref, 2 * B), (*feats, t), _clip_terms(*feats, t, 2 * B),
                               similarity_logit_range(t, feats[0], feats[1]))


@pytest.mark.gpu
def test_gpu_deterministic_mode_is_bitwise_reproducible():
    img, txt = _features((777, 777), 256, "cuda", torch.bfloat16)
    t = torch.tensor(14.3, device="cuda")
    first = value_and_grads(_shared(clip_rows_triton), img, txt, t)
    second = value_and_grads(_shared(clip_rows_triton), img, txt, t)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("deterministic", [True, False])
def test_padded_tile_entries_stay_finite_when_every_logit_is_very_negative(deterministic, device):
    """All pairs anti-aligned at t = 100: every logit is about -100, so a padded entry (z = 0) sits e^100 above the
    row's LSE; unmasked, its exp overflows and 0 * inf poisons the gradients with NaN."""
    B, D = 13, 20  # 13 rows in a 16-row tile: padded rows and columns
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(1, D, generator=g), dim=1)
    img = F.normalize(u + 0.01 * torch.randn(B, D, generator=g), dim=1).to(device)
    txt = F.normalize(-u + 0.01 * torch.randn(B, D, generator=g), dim=1).to(device)
    t = torch.tensor(100.0, device=device)
    # Ill-conditioned on purpose: all logits lie within ~2 of -100, so each gradient is a difference of nearly equal
    # terms (~3e-5 relative between fp32 implementations): the derived bound scales with Z = 100 and with T, the
    # terms' magnitudes, not with the small result. A NaN or a wrong term fails by far.
    _check_shared_fp32(img, txt, t, block_m=16, block_n=16, block_d=16, deterministic=deterministic)
