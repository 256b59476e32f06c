"""dino_loss_triton (fastenc/kernels/dino.py) against `dino_loss_ref` (facebookresearch/dino's pair loop): value and
student gradient for several crop counts, batch sizes, odd K and K blocks, bf16, K = 65536, the teacher batch sum,
and that no [crops x B x K] tensor is kept."""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need triton (it ships with the CUDA build of torch)")

from fastenc.kernels.dino import dino_loss_ref, dino_loss_triton  # noqa: E402
from fastenc.losses.dino import teacher_batch_sum  # noqa: E402
from tests.kernels.tolerances import (  # noqa: E402
    TINY32,
    assert_fp32_kernel,
    assert_fp32_matches_oracle,
    float64_oracle,
)
from tests.losses.helpers import BF16_U, rel_err, saved_not_inputs  # noqa: E402


def _outputs(C, G, B, K, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(C * B, K, generator=g) * 2).to(device=device, dtype=dtype)
    teacher = (torch.randn(G * B, K, generator=g) * 2).to(device=device, dtype=dtype)
    center = (torch.randn(1, K, generator=g) * 0.1).to(device)
    return student, teacher, center


def _value_and_grad(fn, student, teacher, center, **kw):
    s = student.detach().clone().requires_grad_()
    out = fn(s, teacher, center, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), s.grad.float()


def _dino_terms(student, teacher, center, student_temp=0.1, teacher_temp=0.04, num_global_crops=2):
    """(T, Z, underflow) for tests/kernels/tolerances.py: the float64 magnitudes of the terms entering the loss and
    each student-gradient element, the logit range and the allowance for probabilities below fp32's smallest normal.

    The kernel sums, per batch row and k, (sum_i q_i)(sum_v log p_v) - sum_{i<G} q_i log p_i (factored pair sum)
    over B * n_terms: T = that with |log p| + 1 for log p (the 1: the gradient mass through which each logit's
    rounding reaches the value). Its gradient is scale ((sum_i q_i - q_v) - n_v p_v), scale = 1 / (tau_s B n_terms),
    n_v = #{i < G: i != v}: T = scale (sum_i q_i + q_v [v < G] + n_v p_v). Logits: s / tau_s and (t - c) / tau_t,
    Z = the larger of their bounds. At tau_t = 0.04 teacher probabilities reach e^-100, below TINY32 (1.2e-38): each
    of the 2G + 1 probabilities of a gradient element may then be off by TINY32 (gradual underflow or flush to 0)."""
    G = num_global_crops
    s, te, c = (x.detach().double() for x in (student, teacher, center.reshape(1, -1)))
    B = te.shape[0] // G
    C, K = s.shape[0] // B, s.shape[1]
    n_terms = G * C - G
    logp = torch.log_softmax(s / student_temp, -1).view(C, B, K)
    q = torch.softmax((te - c) / teacher_temp, -1).view(G, B, K)
    q_sum = q.sum(0)
    loss = ((q_sum * (logp.abs() + 1).sum(0)).sum() + (q * (logp[:G].abs() + 1)).sum()) / (B * n_terms)
    scale = 1.0 / (student_temp * B * n_terms)
    q_own = torch.cat([q, q.new_zeros(C - G, B, K)])  # q_v for the global crops v < G, else nothing
    n_v = (G - (torch.arange(C, device=s.device) < G).double()).view(C, 1, 1)
    grad = scale * (q_sum + q_own + n_v * logp.exp()).reshape(C * B, K)
    Z = max(s.abs().max().item() / student_temp, (te.abs().max().item() + c.abs().max().item()) / teacher_temp)
    return [loss, grad], Z, (2 * G + 1) * TINY32 * scale


def _check_fp32(student, teacher, center, **kw):
    """fp32 dino_loss_triton (value and student gradient) vs dino_loss_ref in float64, bounds derived from fp32
    rounding (tests/kernels/tolerances.py); plain fp32 dino_loss_ref is the baseline. The kernel reorders the terms
    (K blocks, online max / sum, the factored pair sum) and, compiled, uses fast exp / log."""
    ref_kw = {k: v for k, v in kw.items() if k != "block_k"}
    terms, Z, underflow = _dino_terms(student, teacher, center, **ref_kw)
    assert_fp32_matches_oracle(("loss", "d_student", None, None), lambda s, t, c: dino_loss_triton(s, t, c, **kw),
                               lambda s, t, c: dino_loss_ref(s, t, c, **ref_kw), (student, teacher, center),
                               terms + [None, None], Z, underflow)


def _check_teacher_sum(tsum, teacher):
    """The kernel's [1, K] fp32 teacher sum (atomics over rows in any order) vs the float64 sum: no logits (Z = 0),
    T = sum of |teacher| per column; plain fp32 teacher_batch_sum is the baseline."""
    assert tsum.shape == (1, teacher.shape[1]) and tsum.dtype == torch.float32 and not tsum.requires_grad
    assert_fp32_kernel("teacher_sum", tsum, teacher_batch_sum(teacher), float64_oracle(teacher_batch_sum)(teacher),
                       teacher.double().abs().sum(0, keepdim=True), 0.0)

# (C, G, B, K, block_k): G = 2 with C = 2..6 and 10 (2 global + 8 local), G = 1 and 3, B = 1 and odd, K odd / prime
# and smaller or larger than the K block (several loop steps with a partial last block).
CASES = [
    (2, 2, 1, 7, 16),
    (3, 2, 3, 33, 16),
    (4, 2, 3, 100, 32),
    (5, 2, 2, 37, None),
    (6, 2, 5, 64, 16),
    (10, 2, 3, 100, 64),
    (3, 1, 2, 9, None),
    (6, 3, 2, 5, 16),
]


@pytest.mark.parametrize("C,G,B,K,block_k", CASES)
def test_fp32_equals_reference_and_teacher_sum(C, G, B, K, block_k, device):
    student, teacher, center = _outputs(C, G, B, K, device)
    kw = dict(student_temp=0.1, teacher_temp=0.04, num_global_crops=G)
    _check_fp32(student, teacher, center, block_k=block_k, **kw)
    got = dino_loss_triton(student, teacher, center, block_k=block_k, **kw)
    assert got.dtype == torch.float32 and got.shape == ()
    loss, tsum = dino_loss_triton(student, teacher, center, block_k=block_k, return_teacher_sum=True, **kw)
    assert torch.equal(loss, got)  # the same forward pass, plus the atomics of the sum
    _check_teacher_sum(tsum, teacher)


def test_paper_scale_k(device):
    """K = 65536 prototypes (the paper's head), streamed in 16 blocks of 4096."""
    C, G, B, K = 4, 2, 2, 65536
    student, teacher, center = _outputs(C, G, B, K, device)
    _check_fp32(student, teacher, center, block_k=4096)
    loss, tsum = dino_loss_triton(student, teacher, center, block_k=4096, return_teacher_sum=True)
    assert torch.equal(loss, dino_loss_triton(student, teacher, center, block_k=4096))
    _check_teacher_sum(tsum, teacher)


def test_center_shapes_temperatures_and_a_strided_student(device):
    """center as [K]; other temperatures; student rows with a stride (a column slice of a wider head output: the
    kernel and the reference both slice the [C * B, 2K] leaf, whose right half gets an exact zero gradient)."""
    C, G, B, K = 4, 2, 3, 40
    wide, teacher, center = _outputs(C, G, B, 2 * K, device)
    teacher, center = teacher[:, :K].contiguous(), center[:, :K].reshape(K)
    kw = dict(student_temp=0.2, teacher_temp=0.07, num_global_crops=G)
    (t_loss, t_grad), Z, underflow = _dino_terms(wide[:, :K], teacher, center, **kw)
    assert_fp32_matches_oracle(("loss", "d_wide", None, None),
                               lambda w, t, c: dino_loss_triton(w[:, :K], t, c, block_k=16, **kw),
                               lambda w, t, c: dino_loss_ref(w[:, :K], t, c.reshape(1, K), **kw),
                               (wide, teacher, center), [t_loss, torch.cat([t_grad, 0 * t_grad], 1), None, None],
                               Z, underflow)


def test_teacher_gets_no_gradient_and_collapse_value(device):
    student, teacher, center = _outputs(4, 2, 3, 8, device)
    t = teacher.clone().requires_grad_()
    s = student.clone().requires_grad_()
    dino_loss_triton(s, t, center).backward()
    assert t.grad is None and s.grad is not None
    # Uniform teacher and student: every term is the entropy log K.
    K = 8
    zeros = torch.zeros(4 * 3, K, device=device), torch.zeros(2 * 3, K, device=device), torch.zeros(1, K, device=device)
    terms, Z, _ = _dino_terms(*zeros)
    assert Z == 0
    assert_fp32_kernel("loss", dino_loss_triton(*zeros), dino_loss_ref(*zeros),
                       torch.tensor(math.log(K), dtype=torch.float64), terms[0], Z)


def _plain_bf16(student, teacher, center, student_temp=0.1, teacher_temp=0.04, num_global_crops=2):
    """The reference loop evaluated entirely in bf16 by plain PyTorch (softmaxes, products and sums in bf16)."""
    G = num_global_crops
    B = teacher.shape[0] // G
    C = student.shape[0] // B
    logp = F.log_softmax(student / student_temp, dim=-1).chunk(C)
    q = F.softmax((teacher - center.to(teacher.dtype)) / teacher_temp, dim=-1).detach().chunk(G)
    terms = [torch.sum(-q[i] * logp[v], dim=-1).mean() for i in range(G) for v in range(C) if v != i]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("C", [2, 6])
def test_bf16(C, device):
    """Both the kernel and the reference upcast the bf16 logits, so on the same bf16 values the fp32 loss is checked
    as in fp32 (float64 oracle, derived bound, plain fp32 baseline) and the bf16 gradient is rounded once
    (u = 2^-8). Principle 3's bound (at most twice plain all-bf16 PyTorch's error, floor u) holds a fortiori; both
    are checked."""
    student, teacher, center = _outputs(C, 2, 4, 40, device, torch.bfloat16)
    kw = dict(student_temp=0.1, teacher_temp=0.07, num_global_crops=2)
    want, want_grad = _value_and_grad(dino_loss_ref, student.float(), teacher.float(), center, **kw)
    plain, plain_grad = _value_and_grad(_plain_bf16, student, teacher, center, **kw)
    got, got_grad = _value_and_grad(dino_loss_triton, student, teacher, center, block_k=16, **kw)
    _check_fp32_loss_of_bf16_values(got, want, student, teacher, center, **kw)
    assert rel_err(got_grad, want_grad) <= BF16_U
    for name, g, p, w in (("loss", got, plain, want), ("d_student", got_grad, plain_grad, want_grad)):
        err, err_plain = rel_err(g, w), rel_err(p, w)
        assert err <= max(2 * err_plain, BF16_U), f"{name}: rel err {err:.2e} vs plain bf16 {err_plain:.2e}"


def _check_fp32_loss_of_bf16_values(got, plain_fp32, student, teacher, center, **kw):
    """The fp32 loss the kernel computes from bf16 logits (upcast on load) vs the float64 oracle on the same values;
    plain_fp32: dino_loss_ref in fp32 on them."""
    values = (student.float(), teacher.float(), center)
    terms, Z, _ = _dino_terms(*values, **kw)
    assert_fp32_kernel("loss", got, plain_fp32, float64_oracle(dino_loss_ref)(*values, **kw), terms[0], Z)


def test_bf16_gradient_is_bf16_and_rounded_like_autograd(device):
    """The kernel rounds its fp32 gradient to bf16 once, to nearest even, as autograd rounds the reference's. A
    truncating cast (what the interpreter's own fp32 -> bf16 cast does) is off by one ulp about half the time and
    fails here (checked by swapping it in)."""
    student, teacher, center = _outputs(6, 2, 3, 50, device, torch.bfloat16)
    _, want_grad = _value_and_grad(dino_loss_ref, student, teacher, center)
    s = student.clone().requires_grad_()
    dino_loss_triton(s, teacher, center, block_k=16).backward()
    assert s.grad.dtype == torch.bfloat16
    # Same fp32 gradient up to summation order, then one RTNE rounding each: equal, or one bf16 ulp apart where the
    # fp32 values straddle a rounding boundary (rare), except for elements ~1e-20 of the largest, which are sums
    # cancelling to nothing and may differ relatively by a lot (absolute slack: 1e-6 of the largest element).
    ulp = torch.finfo(torch.bfloat16).eps * want_grad.abs() + 1e-6 * want_grad.abs().max()
    assert ((s.grad.float() - want_grad).abs() <= ulp).all()
    assert (s.grad.float() == want_grad).float().mean() > 0.95


def test_keeps_only_row_statistics_and_creates_no_crop_tensor(device, allocations):
    """Saved for backward beyond the inputs: 2 * B * (C + G) statistics. Allocated in forward + backward: nothing of
    the size of one crop's [B, K] probabilities, only the [C * B, K] student gradient itself. The reference keeps
    its per-crop log-probabilities and probabilities (the check can fail)."""
    C, G, B, K = 10, 2, 4, 256
    student, teacher, center = _outputs(C, G, B, K, device)
    fn = lambda s, t, c: dino_loss_triton(s, t, c, block_k=64)  # noqa: E731
    assert saved_not_inputs(fn, student, teacher, center) == 2 * B * (C + G)
    assert saved_not_inputs(dino_loss_ref, student, teacher, center) >= C * B * K

    def sizes(loss_fn):
        s = student.detach().clone().requires_grad_()
        return [n for n in allocations(lambda: loss_fn(s, teacher, center).backward()) if n >= B * K]

    assert sizes(fn) == [C * B * K]
    assert len(sizes(dino_loss_ref)) > 1


def test_bad_arguments_are_refused(device):
    student, teacher, center = _outputs(4, 2, 3, 8, device)
    with pytest.raises(ValueError, match="center must be"):
        dino_loss_triton(student, teacher, center[:, :4])
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        dino_loss_triton(student, teacher, center, block_k=24)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_paper_scale(dtype):
    C, G, B, K = 10, 2, 64, 65536  # 2 global + 8 local crops, the paper's per-GPU batch and head
    student, teacher, center = _outputs(C, G, B, K, "cuda", dtype)
    # The loss sums 64 x 65536 x 10 terms, the kernel sequentially over 256 K blocks, torch pairwise: the derived
    # bounds (tests/kernels/tolerances.py) cover it through T, the sum of the terms' magnitudes.
    if dtype == torch.float32:
        _check_fp32(student, teacher, center)
    else:
        want, want_grad = _value_and_grad(dino_loss_ref, student.float(), teacher.float(), center)
        got, got_grad = _value_and_grad(dino_loss_triton, student, teacher, center)
        _check_fp32_loss_of_bf16_values(got, want, student, teacher, center)
        assert rel_err(got_grad, want_grad) < BF16_U
    _, tsum = dino_loss_triton(student, teacher, center, return_teacher_sum=True)
    _check_teacher_sum(tsum, teacher)
