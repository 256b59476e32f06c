"""impl="native" (fastenc._C, csrc/losses.cpp) against the reference twins: value and every gradient for CLIP (shared
tile and distributed-style rows), SigLIP blocks and DINO, in fp32 and bf16, odd sizes and chunk sizes, determinism,
and the memory bound itself (nothing of size B x N is kept for backward)."""

import pytest
import torch
import torch.nn.functional as F

from fastenc.losses import native
from fastenc.losses.contrastive import _clip_rows_ref
from fastenc.losses.dino import dino_loss_ref, teacher_batch_sum
from fastenc.losses.sigmoid import _siglip_block_ref
from tests.losses.helpers import BF16_U, rel_err, value_and_grads

if not native.native_available():
    pytest.skip("fastenc._C is not built (python setup.py build_ext --inplace, or make setup)", allow_module_level=True)

from fastenc.losses.native import clip_rows_native, dino_loss_native, siglip_block_native  # noqa: E402

CLIP_NAMES = ("loss", "d_img_rows", "d_txt_rows", "d_img_cols", "d_txt_cols", "d_logit_scale")
SHARED_NAMES = ("loss", "d_img", "d_txt", "d_logit_scale")
SIGLIP_NAMES = ("loss", "d_img", "d_txt", "d_logit_scale", "d_logit_bias")
DINO_NAMES = ("loss", "d_student")


def _feats(sizes, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, D, generator=g), dim=1).to(dtype) for n in sizes]


def _dino_outputs(C, G, B, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(C * B, K, generator=g) * 2).to(dtype)
    teacher = (torch.randn(G * B, K, generator=g) * 2).to(dtype)
    center = torch.randn(1, K, generator=g) * 0.1
    return student, teacher, center


# ----- the formulas evaluated entirely in the inputs' dtype: fp64 oracles, and the plain all-bf16 baseline ----------


def _clip_rows_plain(img_BD, txt_BD, img_ND, txt_ND, t, offset):
    labels = torch.arange(offset, offset + img_BD.shape[0])
    t = t.to(img_BD.dtype)
    return (F.cross_entropy(t * img_BD @ txt_ND.T, labels) + F.cross_entropy(t * txt_BD @ img_ND.T, labels)) / 2


def _siglip_plain(img, txt, t, b, positives):
    z = t.to(img.dtype) * img @ txt.T + b.to(img.dtype)
    labels = -torch.ones_like(z)
    if positives:
        labels.diagonal().fill_(1)
    return -F.logsigmoid(labels * z).sum()


def _dino_plain(student, teacher, center, student_temp, teacher_temp, G):
    """dino_loss_ref's loop over the view pairs, without its upcast to fp32."""
    B = teacher.shape[0] // G
    C = student.shape[0] // B
    q = F.softmax((teacher - center.to(teacher.dtype)) / teacher_temp, dim=-1).chunk(G)
    logp = F.log_softmax(student / student_temp, dim=-1).chunk(C)
    terms = [torch.sum(-q[i] * logp[v], dim=-1).mean() for i in range(G) for v in range(C) if v != i]
    return sum(terms) / len(terms)


# fp32: native evaluates the reference's fp32 formula with the terms summed in another order (BLAS tiles, 256-wide
# blocks, vector lanes) and exp / log from polynomials accurate to ~1-2 ulp instead of torch's. Each output (the loss
# and every gradient tensor) must match the reference to a norm-wise relative error of 2^-19 (16 ulp, 1.9e-6);
# measured at most 1e-6 over these tests (logits up to 100, dot products of up to 300 terms), while one wrong element
# of a 300 x 24 gradient already exceeds it. Where the reference itself is inexact (sums that cancel: a B = 1
# gradient), the two may differ by more; an fp64 evaluation of the same formula then decides: native must be at most
# twice as far from it as the reference.
FP32_REL = 2.0**-19


def _check_fp32(names, fn, ref, exact, *inputs):
    got = value_and_grads(fn, *inputs)
    want = value_and_grads(ref, *inputs)
    oracle = None
    for i, (name, g, w) in enumerate(zip(names, got, want)):
        err = rel_err(g, w)
        if err <= FP32_REL:
            continue
        oracle = oracle or value_and_grads(exact, *[x.double() for x in inputs])
        err_got, err_ref = rel_err(g, oracle[i]), rel_err(w, oracle[i])
        assert err_got <= 2 * err_ref, (f"{name}: rel err {err:.2e} vs reference; vs fp64 {err_got:.2e}, the "
                                        f"reference's {err_ref:.2e}")


def _check_bf16(names, fn, ref, plain, *inputs):
    """bf16 rounds the similarities (or logits) to 8 significant bits (u = 2^-8), which every bf16 implementation
    inherits; against the fp32 reference on the same bf16-rounded inputs, native may be at most twice as far off as a
    plain all-bf16 PyTorch evaluation, floor u (one bf16 rounding) where the plain evaluation's roundings cancel.
    A scalar gradient (dL/dt = sum_ij dz_ij s_ij) is a single number, whose error the plain evaluation sometimes
    cancels by luck far below u (SigLIP 20 x 31 at t = 10: plain 8e-4, while the reference's own bf16 path, bf16
    matmul and fp32 rest, is off by 4.1e-3 > u); native reproduces that path, so for scalars twice its error is
    accepted too (the loss, dL/dt, dL/db); gradient tensors are held to the plain bound alone."""
    exact = value_and_grads(ref, *[x.float() for x in inputs])
    base = value_and_grads(plain, *inputs)
    ref_bf16 = value_and_grads(ref, *inputs)
    got = value_and_grads(fn, *inputs)
    for name, g, p, r, w in zip(names, got, base, ref_bf16, exact):
        err, err_plain, err_ref = rel_err(g, w), rel_err(p, w), rel_err(r, w)
        bound = max(2 * err_plain, BF16_U, 2 * err_ref if g.numel() == 1 else 0.0)
        assert err <= bound, f"{name}: rel err {err:.2e} vs plain bf16 {err_plain:.2e}, reference {err_ref:.2e}"


# ----- CLIP: one process (shared tiles) -----------------------------------------------------------------------------


def _shared(chunk=None):
    """The single-process call: the same tensors as rows and columns, as clip_loss passes them."""
    return lambda i, x, t: clip_rows_native(i, x, i, x, t, 0, chunk=chunk)


def _shared_ref(i, x, t):
    return _clip_rows_ref(i, x, i, x, t, 0)


def _shared_plain(i, x, t):
    return _clip_rows_plain(i, x, i, x, t, 0)


# B = 1, prime B, B > 256 (full 256-wide column blocks plus a tail); chunks that do and do not divide B.
@pytest.mark.parametrize("B,D,chunk", [(1, 5, None), (2, 8, 1), (13, 20, 1), (13, 20, 4), (13, 20, None),
                                       (300, 24, 7), (300, 24, 64), (300, 24, None), (97, 33, 96)])
@pytest.mark.parametrize("scale", [14.3, 100.0])  # open_clip's initial value and its clamp
def test_clip_shared_fp32_equals_reference(B, D, chunk, scale):
    img, txt = _feats((B, B), D)
    _check_fp32(SHARED_NAMES, _shared(chunk), _shared_ref, _shared_plain, img, txt, torch.tensor(scale))


def test_clip_shared_tile_path_is_taken_only_for_the_same_tensors():
    img, txt = _feats((6, 6), 8)
    t = torch.tensor(14.3, requires_grad=True)
    assert type(clip_rows_native(img, txt, img, txt, t, 0).grad_fn).__name__ == "_NativeClipSharedBackward"
    general = clip_rows_native(img, txt, img.clone(), txt, t, 0)
    assert type(general.grad_fn).__name__ == "_NativeClipRowsBackward"
    assert rel_err(general, clip_rows_native(img, txt, img, txt, t, 0)) <= FP32_REL


# ----- CLIP: B local rows against N gathered columns (distributed), and the general path at N = B -----------------


@pytest.mark.parametrize("B,N,offset,D", [(1, 1, 0, 5), (7, 7, 0, 20), (5, 13, 8, 20), (4, 12, 4, 5),
                                          (1, 3, 2, 7), (100, 300, 100, 24)])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_clip_rows_fp32_equal_reference(B, N, offset, D, chunk):
    ins = _feats((B, B, N, N), D)
    if N > B:  # as after a gather: this rank's rows sit at the offset among the columns (own tensors all the same)
        ins[2][offset:offset + B], ins[3][offset:offset + B] = ins[0], ins[1]
    _check_fp32(CLIP_NAMES, lambda *x: clip_rows_native(*x[:4], x[4], offset, chunk=chunk),
                lambda *x: _clip_rows_ref(*x[:4], x[4], offset), lambda *x: _clip_rows_plain(*x[:4], x[4], offset),
                *ins, torch.tensor(14.3))


@pytest.mark.parametrize("scale", [14.3, 100.0])
def test_clip_distributed_style_three_ranks_of_columns(scale):
    """The call clip_loss(distributed=True) makes on rank 1 of 3: B local rows, N = 3B gathered columns, offset B."""
    B, D = 37, 16
    img_ND, txt_ND = _feats((3 * B, 3 * B), D, seed=1)
    img_BD, txt_BD = img_ND[B:2 * B].clone(), txt_ND[B:2 * B].clone()
    _check_fp32(CLIP_NAMES, lambda *x: clip_rows_native(*x[:4], x[4], B, chunk=5),
                lambda *x: _clip_rows_ref(*x[:4], x[4], B), lambda *x: _clip_rows_plain(*x[:4], x[4], B),
                img_BD, txt_BD, img_ND, txt_ND, torch.tensor(scale))


def test_clip_strided_columns_as_clip_loss_gathers_them():
    """clip_loss(distributed=True) gathers [N, 2D] rows and passes column slices (not contiguous) of them."""
    B, D, offset = 6, 10, 6
    img_BD, txt_BD, img_ND, txt_ND = _feats((B, B, 3 * B, 3 * B), D, seed=2)

    def run(fn):
        rows = [img_BD.clone().requires_grad_(), txt_BD.clone().requires_grad_()]
        both_ND2 = torch.cat([img_ND, txt_ND], dim=1).requires_grad_()
        loss = fn(*rows, both_ND2[:, :D], both_ND2[:, D:], torch.tensor(14.3), offset)
        loss.backward()
        return [loss.detach(), rows[0].grad, rows[1].grad, both_ND2.grad]

    got, want = run(lambda *x: clip_rows_native(*x, chunk=4)), run(_clip_rows_ref)
    for name, g, w in zip(("loss", "d_img_rows", "d_txt_rows", "d_cols"), got, want):
        assert rel_err(g, w) <= FP32_REL, name


def test_clip_python_float_and_frozen_scale():
    img, txt = _feats((9, 9), 12)
    want = _clip_rows_ref(img, txt, img, txt, torch.tensor(14.3), 0)
    assert rel_err(clip_rows_native(img, txt, img, txt, 14.3, 0), want) <= FP32_REL
    frozen = torch.tensor(14.3)  # no requires_grad: no gradient is computed or returned for it
    leaf = img.clone().requires_grad_()
    clip_rows_native(leaf, txt, leaf, txt, frozen, 0).backward()
    assert leaf.grad is not None and frozen.grad is None
    p = torch.tensor([14.3], requires_grad=True)  # a [1]-shaped parameter gets its gradient in its own shape
    clip_rows_native(img, txt, img, txt, p, 0).backward()
    assert p.grad.shape == (1,)


@pytest.mark.parametrize("scale", [14.3, 100.0])
@pytest.mark.parametrize("B,chunk", [(1, None), (13, 4), (300, 64)])
def test_clip_shared_bf16_error_within_twice_plain_pytorch(B, chunk, scale):
    img, txt = _feats((B, B), 20, torch.bfloat16)
    _check_bf16(SHARED_NAMES, _shared(chunk), _shared_ref, _shared_plain, img, txt, torch.tensor(scale))


@pytest.mark.parametrize("scale", [14.3, 100.0])
def test_clip_rows_bf16_error_within_twice_plain_pytorch(scale):
    B, N, offset = 9, 27, 9
    ins = _feats((B, B, N, N), 20, torch.bfloat16)
    _check_bf16(CLIP_NAMES, lambda *x: clip_rows_native(*x[:4], x[4], offset, chunk=4),
                lambda *x: _clip_rows_ref(*x[:4], x[4], offset), lambda *x: _clip_rows_plain(*x[:4], x[4], offset),
                *ins, torch.tensor(scale))


def test_bf16_dtypes():
    img, txt = _feats((6, 6), 8, torch.bfloat16)
    img.requires_grad_()
    loss = clip_rows_native(img, txt, img, txt, torch.tensor(14.3), 0)
    loss.backward()
    assert loss.dtype == torch.float32 and img.grad.dtype == torch.bfloat16
    student = torch.randn(6, 10).bfloat16().requires_grad_()
    loss = dino_loss_native(student, torch.randn(4, 10).bfloat16(), torch.zeros(1, 10), 0.1, 0.04, 2)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16


# ----- SigLIP ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,M,positives", [(1, 1, True), (7, 7, True), (13, 13, True), (300, 300, True),
                                           (5, 8, False), (1, 3, False), (300, 37, False), (37, 300, False)])
@pytest.mark.parametrize("chunk", [1, 3, None])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (3.0, 1.5)])  # SigLIP's init; one with z of both signs
def test_siglip_block_fp32_equals_reference(B, M, positives, chunk, scale, bias):
    img, txt = _feats((B, M), 20)
    _check_fp32(SIGLIP_NAMES, lambda i, x, s, c: siglip_block_native(i, x, s, c, positives, chunk=chunk),
                lambda i, x, s, c: _siglip_block_ref(i, x, s, c, positives),
                lambda i, x, s, c: _siglip_plain(i, x, s, c, positives), img, txt, torch.tensor(scale),
                torch.tensor(bias))


def test_siglip_python_float_scale_and_bias():
    img, txt = _feats((11, 11), 16)
    want = _siglip_block_ref(img, txt, torch.tensor(10.0), torch.tensor(-10.0), True)
    assert rel_err(siglip_block_native(img, txt, 10.0, -10.0, True), want) <= FP32_REL


@pytest.mark.parametrize("B,M,positives,chunk", [(9, 9, True, 2), (300, 300, True, None), (20, 31, False, 8)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (3.0, 1.5)])
def test_siglip_bf16_error_within_twice_plain_pytorch(B, M, positives, chunk, scale, bias):
    img, txt = _feats((B, M), 20, torch.bfloat16)
    _check_bf16(SIGLIP_NAMES, lambda i, x, s, c: siglip_block_native(i, x, s, c, positives, chunk=chunk),
                lambda i, x, s, c: _siglip_block_ref(i, x, s, c, positives),
                lambda i, x, s, c: _siglip_plain(i, x, s, c, positives), img, txt, torch.tensor(scale),
                torch.tensor(bias))


# ----- DINO -----------------------------------------------------------------------------------------------------------


def _dino(fn, teacher, center, G, student_temp=0.1, teacher_temp=0.04):
    """fn as a function of the student outputs alone (the teacher side has no gradient)."""
    return lambda s: fn(s, teacher.to(s.dtype) if s.dtype == torch.float64 else teacher,
                        center.double() if s.dtype == torch.float64 else center, student_temp, teacher_temp, G)


@pytest.mark.parametrize("C,G", [(2, 2), (3, 2), (4, 2), (5, 2), (6, 2), (3, 1), (6, 3)])
@pytest.mark.parametrize("B,K", [(1, 7), (5, 300), (3, 1000)])
def test_dino_fp32_equals_reference(C, G, B, K):
    student, teacher, center = _dino_outputs(C, G, B, K)
    _check_fp32(DINO_NAMES, _dino(dino_loss_native, teacher, center, G), _dino(dino_loss_ref, teacher, center, G),
                _dino(_dino_plain, teacher, center, G), student)
    assert dino_loss_native(student, teacher, center, 0.1, 0.04, G).shape == ()


@pytest.mark.parametrize("center_shape", ["1K", "K"])
def test_dino_return_teacher_sum(center_shape):
    C, G, B, K = 6, 2, 5, 300
    student, teacher, center = _dino_outputs(C, G, B, K)
    center = center if center_shape == "1K" else center.reshape(K)
    s = student.clone().requires_grad_()
    loss, teacher_sum_1K = dino_loss_native(s, teacher, center, 0.1, 0.04, G, return_teacher_sum=True)
    assert teacher_sum_1K.shape == (1, K) and teacher_sum_1K.dtype == torch.float32
    assert not teacher_sum_1K.requires_grad
    # a sum of G * B = 10 fp32 values per column, in another order than torch's: a few ulp of the partial sums
    torch.testing.assert_close(teacher_sum_1K, teacher_batch_sum(teacher), rtol=1e-6, atol=1e-5)
    loss.backward()  # the loss of the two-output call is the same loss, with the same gradient
    want = value_and_grads(lambda x: dino_loss_ref(x, teacher, center, 0.1, 0.04, G), student)
    for name, g, w in zip(DINO_NAMES, [loss.detach(), s.grad], want):
        assert rel_err(g, w) <= FP32_REL, name
    bf16 = teacher.bfloat16()
    _, sum_bf16 = dino_loss_native(student.bfloat16(), bf16, center, 0.1, 0.04, G, return_teacher_sum=True)
    torch.testing.assert_close(sum_bf16, teacher_batch_sum(bf16), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("C,G,B,K", [(6, 2, 4, 40), (3, 2, 5, 300)])
def test_dino_bf16_error_within_twice_plain_pytorch(C, G, B, K):
    student, teacher, center = _dino_outputs(C, G, B, K, torch.bfloat16)
    _check_bf16(DINO_NAMES, lambda s: dino_loss_native(s, teacher, center, 0.1, 0.07, G),
                lambda s: dino_loss_ref(s, teacher.float(), center, 0.1, 0.07, G),
                lambda s: _dino_plain(s, teacher, center, 0.1, 0.07, G), student)


# ----- determinism, argument checks, the missing-extension error ---------------------------------------------------


def test_two_calls_are_bitwise_equal():
    img, txt, img_N, txt_N = _feats((300, 300, 600, 600), 24)
    t, b = torch.tensor(14.3), torch.tensor(-5.0)
    student, teacher, center = _dino_outputs(6, 2, 8, 700)
    cases = [
        (_shared(64), (img, txt, t)),
        (_shared(64), (img.bfloat16(), txt.bfloat16(), t)),
        (lambda *x: clip_rows_native(*x[:4], x[4], 300, chunk=64), (img, txt, img_N, txt_N, t)),
        (lambda i, x, s, c: siglip_block_native(i, x, s, c, True, chunk=64), (img, txt, t, b)),
        (lambda s: dino_loss_native(s, teacher, center, 0.1, 0.04, 2), (student,)),
    ]
    for fn, ins in cases:
        first, second = value_and_grads(fn, *ins), value_and_grads(fn, *ins)
        assert all(torch.equal(x, y) for x, y in zip(first, second))
    sums = [dino_loss_native(student, teacher, center, 0.1, 0.04, 2, return_teacher_sum=True)[1] for _ in range(2)]
    assert torch.equal(*sums)


def test_bad_arguments_are_refused():
    img, txt = _feats((4, 4), 8)
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        clip_rows_native(img, txt, img, txt, 10.0, 0, chunk=0)
    with pytest.raises(ValueError, match="offset"):
        clip_rows_native(img, txt, img, txt, 10.0, 1)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        clip_rows_native(img.double(), txt.double(), img.double(), txt.double(), 10.0, 0)
    with pytest.raises(ValueError, match="share a dtype"):
        clip_rows_native(img, txt.bfloat16(), img, txt.bfloat16(), 10.0, 0)
    with pytest.raises(ValueError, match="must be square"):
        siglip_block_native(img, txt[:3], 10.0, -10.0, True)
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        siglip_block_native(img, txt, 10.0, -10.0, True, chunk=-2)
    with pytest.raises(ValueError, match="num_global_crops"):
        dino_loss_native(torch.randn(6, 5), torch.randn(4, 5), torch.zeros(1, 5), 0.1, 0.04, 3)


def test_missing_extension_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(native, "_C", None)
    assert not native.native_available()
    img, txt = _feats((3, 3), 4)
    with pytest.raises(ImportError, match=r"build_ext --inplace.*FASTENC_NO_NATIVE"):
        clip_rows_native(img, txt, img, txt, 10.0, 0)
    with pytest.raises(ImportError, match="make setup"):
        dino_loss_native(torch.randn(4, 5), torch.randn(4, 5), torch.zeros(5), 0.1, 0.04, 2)


# ----- the memory bound: what autograd keeps for backward ------------------------------------------------------------


def _saved(fn, *inputs) -> list[torch.Tensor]:
    """The tensors autograd keeps for backward while building fn's graph (fn gets fresh leaves)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    leaves = [x.clone().requires_grad_() for x in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    return saved


def test_no_b_by_n_tensor_is_kept_for_backward():
    B, D = 256, 8
    img, txt = _feats((B, B), D)
    scale = torch.tensor(14.3, requires_grad=True)
    ref = _saved(lambda i, x: _clip_rows_ref(i, x, i, x, scale, 0), img, txt)
    assert max(t.numel() for t in ref) >= B * B  # the reference keeps its logits / softmax (the check can fail)
    shared = _saved(lambda i, x: clip_rows_native(i, x, i, x, scale, 0), img, txt)
    # the features themselves and the row and column softmax statistics (max, 1 / sum-exp)
    assert sorted(t.numel() for t in shared) == [2 * B, 2 * B, B * D, B * D]
    rows = _saved(lambda i, x: clip_rows_native(i, x, i.clone(), x.clone(), scale, 0), img, txt)
    assert sorted(t.numel() for t in rows) == [2 * B] * 2 + [B * D] * 4
    t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    siglip = _saved(lambda i, x: siglip_block_native(i, x, t, b, True), img, txt)
    assert [s.numel() for s in siglip] == [B * D, B * D]  # only the inputs


def test_dino_keeps_only_inputs_and_row_statistics():
    C, G, B, K = 6, 2, 4, 64
    student, teacher, center = _dino_outputs(C, G, B, K)
    saved = _saved(lambda s: dino_loss_native(s, teacher, center, 0.1, 0.04, G), student)
    # student, teacher, center and two statistics per view row: nothing of size [crops, B, K] is new
    assert sorted(t.numel() for t in saved) == sorted([C * B * K, G * B * K, K, 2 * C * B, 2 * G * B])
    ref = _saved(lambda s: dino_loss_ref(s, teacher, center, 0.1, 0.04, G), student)
    assert sum(t.numel() for t in ref) >= 2 * C * B * K  # the reference keeps probability tensors (can fail)


# ----- through the public losses (impl="native") ----------------------------------------------------------------------


def test_public_losses_with_impl_native():
    from fastenc.losses import clip_loss, siglip_loss
    from fastenc.losses.dino import dino_loss

    img, txt = _feats((11, 11), 16)
    t, b = torch.tensor(20.0), torch.tensor(-10.0)
    cases = [
        (SHARED_NAMES, lambda impl: (lambda i, x, s: clip_loss(i, x, s, impl=impl)), (img, txt, t)),
        (SIGLIP_NAMES, lambda impl: (lambda i, x, s, c: siglip_loss(i, x, s, c, impl=impl)), (img, txt, t, b)),
    ]
    student, teacher, center = _dino_outputs(4, 2, 3, 50)
    cases.append((DINO_NAMES, lambda impl: (lambda s: dino_loss(s, teacher, center, impl=impl)), (student,)))
    for names, loss_with, ins in cases:
        got, want = value_and_grads(loss_with("native"), *ins), value_and_grads(loss_with("reference"), *ins)
        for name, g, w in zip(names, got, want):
            assert rel_err(g, w) <= FP32_REL, name
