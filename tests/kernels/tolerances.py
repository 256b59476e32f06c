"""fp32 kernel checks against a float64 oracle, with tolerances derived from fp32 rounding (shared by tests/kernels).

Fixed rtol / atol tuned under the Triton interpreter (exp / log from numpy, float64 then rounded) failed compiled on
an H200 (issue 14: fast fp32 exp / log, fused multiply-adds). Both are correct fp32 evaluations; how far apart they
may be depends on the conditioning of each output (logit range, cancellation), not on one constant. So each fp32
comparison of a kernel (`assert_fp32_matches_oracle`):

* takes as the truth the loss's own reference function evaluated in float64 (`float64_oracle`);
* bounds every output element of the kernel by `fp32_bound` (derived below), given the float64 magnitudes T of the
  terms entering that element (each test module writes them for its loss: `*_terms`);
* requires the kernel's norm-wise error to be at most PLAIN_FACTOR times that of plain fp32 PyTorch (the same
  reference function on the fp32 inputs), plus a floor of one rounding of every logit.

The bound. Each fp32 operation rounds with relative error <= eps / 2 (EPS32 = eps = 2^-23). A logit (t * x . y + b,
s / tau) is then off by at most a few eps * Z, where Z bounds |logit| (`logit_range`: |t| max|x| max|y| + |b|; the
fp32 dot's own error is ~eps |x| |y| at these D). A softmax / sigmoid entry inherits a relative error <= 2 max |dz|
(its shift by the row's max / LSE doubles it) plus a few ulp of exp / log; a value (log-sum-exp, log-probability) the
absolute error max|dz| per unit of gradient mass. An output that sums terms of total magnitude T (sum of |term|,
the positives' -1 and one unit per logit's gradient mass included: where they cancel to ~0, e.g. the exactly-zero
CLIP gradient at B = 1, the error stays of the order of the terms, not of the result) therefore has
    |fp32 - exact| <= FP32_C * EPS32 * (1 + Z) * T,
FP32_C = 4 counting those roundings (~2 for the LSE shift, ~2 for exp / log ulps and the summation depth at the
tested sizes). Probabilities below the smallest normal fp32 (TINY32, e.g. e^-100) keep no relative precision (gradual
underflow, or flushed to zero on a GPU): `underflow` adds TINY32 per such term, times the factor scaling it.
The bound grows with t and with the cancellation in each output, and a wrong term still fails: at t = 100 it is
~5e-5 T, so an error of 1e-3 relative in an output is caught wherever that output is more than ~5 % of its terms
(most elements; shown by scaling a kernel's gradient by 1 + 1e-3).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

EPS32 = torch.finfo(torch.float32).eps  # 2^-23; one fp32 rounding is <= EPS32 / 2 relative
TINY32 = torch.finfo(torch.float32).tiny  # smallest normal fp32, 2^-126

# C in C * EPS32 * (1 + Z) * T: counted roundings (module docstring), not fitted. Largest element error measured on
# the cases of tests/kernels, in units of EPS32 (1 + Z) T: 1.1 under the interpreter (DINO at K = 65536; plain fp32
# PyTorch alike), 1.6 compiled on an H200 (SigLIP at B = 1000, where plain fp32 PyTorch reaches 1.1).
FP32_C = 4.0

# Norm-wise, a kernel may be at most this many times as far from float64 as plain fp32 PyTorch (plus the floor).
PLAIN_FACTOR = 4.0


class _KeepFloat64(TorchFunctionMode):
    """`Tensor.float()` returns a float64 tensor unchanged. The references upcast their logits with `.float()` (meant
    as "at least fp32", for bf16 features); without this a float64 evaluation would be rounded to fp32 there."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float and not kwargs and args[0].dtype == torch.float64:
            return args[0]
        return func(*args, **kwargs)


def float64_oracle(fn):
    """fn evaluated in float64: floating tensor arguments cast with .double() (pass every tensor input as an argument,
    not through a closure) and the reference's `.float()` upcasts kept at float64. The truth of these tests."""

    def run(*args, **kwargs):
        args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with _KeepFloat64():
            return fn(*args, **kwargs)

    return run


def value_and_grads_keep_dtype(fn, *inputs: torch.Tensor) -> list:
    """[loss, d loss / d input for each input (None where the input gets no gradient)], every input a fresh leaf that
    requires grad, each in the dtype it was computed in (tests/losses/helpers.value_and_grads returns fp32, which
    would round the float64 oracle)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def similarity_logit_range(logit_scale, a: torch.Tensor, b: torch.Tensor, logit_bias=0.0) -> float:
    """Z for logits t * a_i . b_j + bias: |t| max_i |a_i| max_j |b_j| + |bias| >= every |logit| (Cauchy-Schwarz)."""
    t, bias = (float(torch.as_tensor(x).detach()) for x in (logit_scale, logit_bias))
    max_a, max_b = (x.detach().double().norm(dim=1).max().item() for x in (a, b))
    return abs(t) * max_a * max_b + abs(bias)


def fp32_bound(terms: torch.Tensor, logit_range: float, underflow: float = 0.0, c: float = FP32_C) -> torch.Tensor:
    """Largest error an fp32 evaluation may make in each output element: c EPS32 (1 + Z) T + underflow (module
    docstring). terms: float64 sum of |terms| entering each element (T); logit_range: Z, a bound of the logits' |z|;
    underflow: absolute allowance for terms below TINY32 (0 where none can matter)."""
    return c * EPS32 * (1.0 + float(logit_range)) * terms.double() + underflow


def norm_err(x: torch.Tensor, want: torch.Tensor, terms: torch.Tensor) -> float:
    """||x - want|| / ||terms||: the error norm-wise, relative to the magnitude of the terms (not of the result, which
    may be ~0 where the terms cancel)."""
    return ((x.double() - want.double()).norm() / terms.double().norm().clamp_min(1e-300)).item()


def assert_fp32_kernel(name: str, got: torch.Tensor, plain: torch.Tensor, want: torch.Tensor, terms: torch.Tensor,
                       logit_range: float, underflow: float = 0.0) -> None:
    """An fp32 kernel output `got` against the float64 oracle's `want`, given plain fp32 PyTorch's `plain` and the
    float64 term magnitudes `terms` (broadcast to want's shape) of this output:

    1. every element within fp32_bound(terms, logit_range, underflow);
    2. norm-wise, at most PLAIN_FACTOR x plain PyTorch's error + EPS32 (1 + Z) (the bound with c = 1: one rounding
       of each logit, doubled by the LSE shift; what two correct fp32 evaluations differ by even where one of them
       is exact by luck, e.g. plain PyTorch's exact 0 for the CLIP gradient at B = 1)."""
    want = want.double()
    terms = terms.double().expand_as(want)
    err = (got.double() - want).abs()
    bound = fp32_bound(terms, logit_range, underflow)
    if not bool((err <= bound).all()):
        worst = (err / bound.clamp_min(1e-300)).flatten().argmax()
        raise AssertionError(
            f"{name}: fp32 error {err.flatten()[worst].item():.3e} at element {worst.item()} is "
            f"{(err / bound.clamp_min(1e-300)).max().item():.2f}x its derived bound {bound.flatten()[worst].item():.3e}"
            f" (C eps (1 + Z) T with Z = {float(logit_range):.4g}, T = {terms.flatten()[worst].item():.3e}; "
            f"kernel {got.flatten()[worst].item():.9g}, float64 {want.flatten()[worst].item():.9g})")
    e_got, e_plain = norm_err(got, want, terms), norm_err(plain, want, terms)
    floor = EPS32 * (1.0 + float(logit_range))
    assert e_got <= PLAIN_FACTOR * e_plain + floor, (
        f"{name}: norm-wise error {e_got:.3e} (relative to the terms) > {PLAIN_FACTOR:g} x plain fp32 PyTorch's "
        f"{e_plain:.3e} + floor {floor:.3e}")


def assert_fp32_matches_oracle(names, kernel, reference, inputs, terms, logit_range: float,
                               underflow: float = 0.0) -> None:
    """value_and_grads of the fp32 `kernel` and of plain fp32 `reference` on `inputs`, against `reference` in float64,
    output by output (names; an output named None is skipped), with the float64 term magnitudes `terms` (one per
    output) and the logit range Z: see assert_fp32_kernel."""
    want = value_and_grads_keep_dtype(float64_oracle(reference), *inputs)
    plain = value_and_grads_keep_dtype(reference, *inputs)
    got = value_and_grads_keep_dtype(kernel, *inputs)
    for name, g, p, w, t in zip(names, got, plain, want, terms):
        if name is not None:
            assert g.dtype == torch.float32, f"{name}: {g.dtype}"
            assert_fp32_kernel(name, g, p, w, t, logit_range, underflow)
