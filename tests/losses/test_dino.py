"""dino_loss against the reference definition (facebookresearch/dino's DINOLoss loop), and the center update.

The reference loops over every (teacher view i, student view v != i) pair; `dino_loss` factors the pair sum. They
must agree in value and in the gradient w.r.t. the student outputs (the teacher side has no gradient), for several
crop counts and batch sizes, in fp32 and bf16. The center update is checked with 2 real gloo ranks.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastenc.losses.dino import dino_center_update, dino_loss, dino_loss_ref
from tests.gloo import run_ranks

from .helpers import rel_err


def _outputs(C, G, B, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(C * B, K, generator=g) * 2).to(dtype)
    teacher = (torch.randn(G * B, K, generator=g) * 2).to(dtype)
    center = torch.randn(1, K, generator=g) * 0.1
    return student, teacher, center


def _value_and_grad(fn, student, teacher, center, **kw):
    s = student.detach().clone().requires_grad_()
    loss = fn(s, teacher, center, **kw)
    loss.backward()
    return loss.detach(), s.grad.float()


@pytest.mark.parametrize("C,G,B,K", [(2, 2, 1, 7), (2, 2, 4, 16), (4, 2, 3, 33), (10, 2, 5, 64), (3, 1, 2, 9),
                                     (6, 3, 2, 5)])
def test_matches_reference_loop_fp32(C, G, B, K):
    student, teacher, center = _outputs(C, G, B, K)
    kw = dict(student_temp=0.1, teacher_temp=0.04, num_global_crops=G)
    want, want_grad = _value_and_grad(dino_loss_ref, student, teacher, center, **kw)
    got, got_grad = _value_and_grad(dino_loss, student, teacher, center, **kw)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert rel_err(got_grad, want_grad) < 1e-5


def test_bf16_inputs():
    student, teacher, center = _outputs(6, 2, 4, 40, dtype=torch.bfloat16)
    kw = dict(student_temp=0.1, teacher_temp=0.07, num_global_crops=2)
    want, want_grad = _value_and_grad(dino_loss_ref, student.float(), teacher.float(), center, **kw)
    got, got_grad = _value_and_grad(dino_loss, student, teacher, center, **kw)
    # Both compute in fp32 from the same bf16 values: only the summation order differs.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert rel_err(got_grad, want_grad) < 1e-2  # the bf16 gradient is rounded once (u = 2^-8)


def test_hand_computed_value():
    """C = 2, G = 2, B = 1, K = 2: loss = mean(H(q0, p1), H(q1, p0)) written out."""
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    center = torch.tensor([[0.1, -0.1]])
    q = F.softmax((teacher - center) / 0.5, dim=-1)
    logp = F.log_softmax(student / 0.25, dim=-1)
    want = (-(q[0] * logp[1]).sum() - (q[1] * logp[0]).sum()) / 2
    got = dino_loss(student, teacher, center, student_temp=0.25, teacher_temp=0.5, num_global_crops=2)
    torch.testing.assert_close(got, want)


def test_teacher_gets_no_gradient_and_collapse_values():
    student, teacher, center = _outputs(4, 2, 3, 8)
    t = teacher.clone().requires_grad_()
    s = student.clone().requires_grad_()
    dino_loss(s, t, center).backward()
    assert t.grad is None and s.grad is not None
    # A uniform teacher and uniform student: every term is the entropy log K.
    K = 8
    zero_s, zero_t = torch.zeros(4 * 3, K), torch.zeros(2 * 3, K)
    torch.testing.assert_close(dino_loss(zero_s, zero_t, torch.zeros(1, K)), torch.tensor(math.log(K)))


@pytest.mark.parametrize("bad,match", [
    (dict(student=torch.zeros(5, 8)), "expected num_crops \\* B"),
    (dict(teacher=torch.zeros(5, 8)), "not a multiple of num_global_crops"),
    (dict(student=torch.zeros(12, 9)), "same out_dim"),
    (dict(center=torch.zeros(2, 8)), "center must be \\[1, K\\]"),
    (dict(student=torch.zeros(3, 8)), "num_crops >= num_global_crops"),
])
def test_shape_errors(bad, match):
    args = {"student": torch.zeros(12, 8), "teacher": torch.zeros(6, 8), "center": torch.zeros(1, 8)}
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        dino_loss(args["student"], args["teacher"], args["center"])


def test_unknown_impl():
    student, teacher, center = _outputs(4, 2, 3, 8)
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        dino_loss(student, teacher, center, impl="fast")


def test_center_update_single_process():
    _, teacher, center = _outputs(4, 2, 3, 8)
    new = dino_center_update(center, teacher, momentum=0.9)
    torch.testing.assert_close(new, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


# ----- 2 gloo ranks: the center averages over the global batch -----

WORLD, LOCAL_ROWS, K = 2, (3, 5), 11  # unequal local row counts: the mean is over rows, not over rank means


def _center_worker(rank, world):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(sum(LOCAL_ROWS), K, generator=g)
    center = torch.randn(1, K, generator=g)
    start = sum(LOCAL_ROWS[:rank])
    local = teacher[start:start + LOCAL_ROWS[rank]]
    new = dino_center_update(center, local, momentum=0.9, distributed=True)
    return {"new": new, "teacher": teacher, "center": center}


@pytest.mark.distributed
def test_center_update_two_ranks(tmp_path):
    res = run_ranks(_center_worker, WORLD, tmp_path, timeout_s=90)
    want = 0.9 * res[0]["center"] + 0.1 * res[0]["teacher"].mean(0, keepdim=True)
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["new"], want, rtol=1e-6, atol=1e-6)
