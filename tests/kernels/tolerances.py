"""fp32 kernel checks against a float64 oracle, with tolerances derived from fp32 rounding (shared by tests/kernels).

Why not fixed rtol / atol: they were tuned under the Triton interpreter, whose exp / log are numpy's (float64, then
rounded), and failed on a GPU (issue 14), where compiled Triton evaluates fp32 exp / log with the fast hardware
approximations and fuses multiply-adds. Both are legitimate fp32 implementations; what they may differ by depends
on the problem's conditioning (the logit range), not on a constant. So every fp32 comparison here:

* takes as the truth the loss's own reference function evaluated in float64 (`float64_oracle`);
* bounds each output element of the kernel by `fp32_bound(terms, logit_range)` (derivation below), with `terms`
  the float64 sum of |terms| that enter that element in the kernel's algorithm (each test module writes these
  magnitudes for its loss);
* checks that the kernel is at most PLAIN_FACTOR times as far from the truth as plain fp32 PyTorch (the same
  reference function on the fp32 inputs), plus a floor of one fp32 rounding of every logit and output
  (`assert_fp32_kernel`).

Derivation of the bound. Rounding a product or a sum in fp32 costs at most eps / 2 relative (EPS32 = 2^-23). A
logit z = t * x . y (or s / tau) then carries an absolute error of a few eps * Z, with Z = `logit_range`, an upper
bound of |z| (t * max|x| * max|y| for the similarity losses: the fp32 dot's own error is ~eps |x| |y| at these D).
A softmax / sigmoid entry p = f(z) inherits a relative error <= 2 max|dz| (the shift by its row's LSE doubles it) plus
the few ulp of a fast exp / log, and an output that sums terms of total magnitude T = sum |term| (the positives'
-1 included: they cancel to ~0 in a well-trained or B = 1 loss, which is what makes the output ill-conditioned) adds
one more rounding per addition level. In all, |kernel - exact| <= C * eps * (1 + Z) * T per element, C = FP32_C
covering those small counts (2 for the LSE shift, ~2 for exp / log ulps and the summation depth at these sizes).
This grows with t and with the cancellation in each output, and it stays far below a wrong term: at t = 100 the
bound is ~5e-5 * T, while a 1e-3 relative error of an output is ~1e-3 * T wherever the output is not itself
cancelled down to < 5 % of its terms (most elements; checked by perturbing the kernel's outputs by 1 + 1e-3).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

EPS32 = torch.finfo(torch.float32).eps  # 2^-23: the fp32 unit roundoff is EPS32 / 2

# C of the bound C * EPS32 * (1 + Z) * T (module docstring): rounding counts, not a fitted constant. Measured worst
# element / (EPS32 (1 + Z) T) on the cases of tests/kernels: ~0.3 under the interpreter and plain fp32 PyTorch,
# ~0.6 compiled on an H200 (fast exp, fused multiply-adds).
FP32_C = 4.0

# The kernel's norm-wise error may be at most this multiple of plain fp32 PyTorch's (both against float64).
PLAIN_FACTOR = 4.0


class _KeepFloat64(TorchFunctionMode):
    """`Tensor.float()` leaves a float64 tensor as it is. The references upcast their logits with `.float()` (meant
    as "at least fp32": bf16 features); without this, a float64 evaluation would be rounded back to fp32 there."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float and not kwargs and args[0].dtype == torch.float64:
            return args[0]
        return func(*args, **kwargs)


def float64_oracle(fn):
    """fn run in float64: floating tensor arguments cast with .double(), the reference's fp32 upcasts kept at float64.
    Its results are the truth the fp32 kernel and plain fp32 PyTorch are both measured against."""

    def run(*args, **kwargs):
        args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with _KeepFloat64():
            return fn(*args, **kwargs)

    return run


def value_and_grads(fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """[loss, d loss / d input for each input], every input a fresh leaf that requires grad, in the dtype computed
    (tests/losses/helpers.value_and_grads casts to fp32, which would round the float64 oracle)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def fp32_bound(terms: torch.Tensor, logit_range: float, c: float = FP32_C) -> torch.Tensor:
    """Largest error an fp32 evaluation may have in each output element: c * EPS32 * (1 + Z) * T (module docstring).

    terms: float64 sum of |terms| entering each element (T); logit_range: an upper bound Z of the logits' |z|."""
    return c * EPS32 * (1.0 + float(logit_range)) * terms


def norm_err(x: torch.Tensor, want: torch.Tensor, terms: torch.Tensor) -> float:
    """||x - want|| / ||terms||: the error norm-wise, relative to the magnitude of the terms (not of the result,
    which may be ~0 where the terms cancel)."""
    return ((x.double() - want).norm() / terms.norm().clamp_min(1e-300)).item()


def assert_fp32_kernel(name: str, got: torch.Tensor, plain: torch.Tensor, want: torch.Tensor, terms: torch.Tensor,
                       logit_range: float) -> None:
    """The fp32 kernel's `got` against the float64 oracle's `want`, given plain fp32 PyTorch's `plain` and the
    float64 term magnitudes `terms` (same shape as want) of this output:

    1. every element within fp32_bound(terms, logit_range);
    2. norm-wise, at most PLAIN_FACTOR times plain PyTorch's error plus a floor of one rounding of every logit and
       of the output (EPS32 * (1 + Z), i.e. fp32_bound with c = 1): the floor is what two correct fp32 evaluations
       may differ by even when one of them happens to be (near) exact, e.g. plain PyTorch's exact 0 at B = 1."""
    want = want.double()
    terms = terms.double().expand_as(want)
    err = (got.double() - want).abs()
    bound = fp32_bound(terms, logit_range)
    ratio = (err / bound.clamp_min(1e-300)).max().item()
    assert (err <= bound).all(), (
        f"{name}: fp32 error {err.max().item():.2e} exceeds the derived bound (worst element at {ratio:.2f}x its "
        f"bound C eps (1 + Z) T with Z = {float(logit_range):.3g}, max T = {terms.max().item():.2e})")
    e_got, e_plain = norm_err(got, want, terms), norm_err(plain, want, terms)
    floor = EPS32 * (1.0 + float(logit_range))
    assert e_got <= PLAIN_FACTOR * e_plain + floor, (
        f"{name}: norm-wise error {e_got:.2e} (relative to the terms) > {PLAIN_FACTOR:g} x plain fp32 PyTorch's "
        f"{e_plain:.2e} + floor {floor:.2e}")
