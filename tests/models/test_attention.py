"""Attention backends against the fp32 reference (`attention_ref`, impl="math"), forward and backward."""

import warnings

import pytest
import torch

import fastenc.utils.optional as optional
from fastenc.models.layers import attention as attention_module
from fastenc.models.layers.attention import Attention, attention, attention_ref
from fastenc.utils.optional import MissingDependency

# B=1 with prime N, a single token, and an ordinary size.
SHAPES = [(1, 2, 17, 8), (2, 3, 1, 16), (2, 4, 64, 32)]


def _attention_plain(q, k, v, causal):
    """What a user would write in plain PyTorch, in the input dtype: the error budget for a fast path."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def _assert_error_budget(label, fast, plain, oracle):
    """Principle 3: a fast path may be at most ~2x worse than plain PyTorch at the same precision, both measured
    against an fp32 oracle. Judged on RMS error, which is stable across seeds; the max error is a one-element
    statistic (measured sdpa/plain max ratios on CPU bf16 range 0.2-2.05 over seeds), so it only gets a 4x guard
    against a localized blow-up. The 1e-6 floors matter only for N=1, where every path is exact."""
    for name, f, p, o in zip(("out", "dq", "dk", "dv"), fast, plain, oracle):
        assert f.dtype == p.dtype
        err_f, err_p = f.float() - o, p.float() - o
        rms_f, rms_p = err_f.pow(2).mean().sqrt().item(), err_p.pow(2).mean().sqrt().item()
        max_f, max_p = err_f.abs().max().item(), err_p.abs().max().item()
        assert rms_f <= 2 * rms_p + 1e-6, f"{label} {name}: RMS error {rms_f:.3g} vs plain {rms_p:.3g}"
        assert max_f <= 4 * max_p + 1e-6, f"{label} {name}: max error {max_f:.3g} vs plain {max_p:.3g}"


def _out_and_grads(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def _qkv(shape, dtype):
    return [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_matches_ref_fp32(shape, causal):
    q, k, v = _qkv(shape, torch.float32)
    grad_out = torch.randn(shape)
    ref = _out_and_grads(lambda *t: attention(*t, causal=causal, impl="math"), q, k, v, grad_out)
    fast = _out_and_grads(lambda *t: attention(*t, causal=causal, impl="sdpa"), q, k, v, grad_out)
    # fp32: both sum <= 64 products of O(1) terms; measured differences are <= 2e-6, so 1e-5 is 5x headroom.
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_error_within_twice_plain_pytorch(shape, causal, impl):
    q, k, v = _qkv(shape, torch.bfloat16)
    grad_out = torch.randn(shape, dtype=torch.bfloat16)
    # Oracle: the reference in fp32 on exactly the same (bf16-representable) inputs.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    oracle = _out_and_grads(lambda *t: attention_ref(*t, causal=causal), q32, k32, v32, grad_out.float())
    fast = _out_and_grads(lambda *t: attention(*t, causal=causal, impl=impl), q, k, v, grad_out)
    plain = _out_and_grads(lambda *t: _attention_plain(*t, causal), q, k, v, grad_out)
    assert fast[0].dtype == torch.bfloat16
    _assert_error_budget(impl, fast, plain, oracle)


def test_causal_mask_blocks_future_keys():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    out = attention(q, k, v, causal=True, impl="math")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] += 10.0
    v2[:, :, 5:] -= 10.0
    out2 = attention(q, k2, v2, causal=True, impl="math")
    torch.testing.assert_close(out2[:, :, :5], out[:, :, :5], atol=0, rtol=0)
    assert not torch.allclose(out2[:, :, 5:], out[:, :, 5:])


def test_unknown_impl_lists_choices():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="choose one of auto, flash, sdpa, math"):
        attention(q, q, q, impl="xformers")
    with pytest.raises(ValueError, match="'fast'"):
        Attention(32, 4, attn_impl="fast")


def test_mismatched_shapes_are_explained():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"equal shape \[B, H, N, Dh\]"):
        attention(q, q[:, :, :3], q)


def test_explicit_flash_on_cpu_says_what_to_do():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="needs CUDA fp16/bf16 tensors.*attn_impl='auto'"):
        attention(q, q, q, impl="flash")


def test_explicit_flash_without_flash_attn_raises_missing_dependency(monkeypatch):
    if optional.is_available("flash_attn"):
        pytest.skip("flash_attn is installed")
    monkeypatch.setattr(attention_module, "_check_flash_inputs", lambda q: None)  # pretend the tensor is on CUDA
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(MissingDependency, match="'flash_attn' is required for attn_impl='flash'.*pip install flash-attn"):
        attention(q, q, q, impl="flash")


def test_auto_uses_sdpa_on_cpu_without_warning(recwarn):
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    out = attention(q, k, v, impl="auto")
    torch.testing.assert_close(out, attention(q, k, v, impl="sdpa"), atol=0, rtol=0)
    assert not recwarn.list


def test_auto_on_cuda_without_flash_attn_warns_once(monkeypatch):
    class FakeCudaTensor:  # _resolve_auto only looks at these two attributes
        is_cuda, dtype = True, torch.bfloat16

    monkeypatch.setattr(attention_module, "is_available", lambda name: False)
    monkeypatch.setattr(optional, "_warned", set())
    with pytest.warns(UserWarning, match="flash_attn is not installed"):
        assert attention_module._resolve_auto(FakeCudaTensor()) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback must be silent
        assert attention_module._resolve_auto(FakeCudaTensor()) == "sdpa"


def test_attention_module_impl_is_switchable():
    torch.manual_seed(0)
    module = Attention(32, 4, attn_impl="sdpa").eval()
    x = torch.randn(2, 7, 32)
    out_sdpa = module(x)
    module.attn_impl = "math"
    torch.testing.assert_close(module(x), out_sdpa, atol=1e-5, rtol=1e-5)
    assert [name for name, _ in module.named_parameters()] == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["flash", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_bf16_error_within_twice_plain_pytorch(impl, causal):
    if impl == "flash":
        pytest.importorskip("flash_attn")
    shape = (2, 4, 129, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    oracle = _out_and_grads(lambda *t: attention_ref(*t, causal=causal), q32, k32, v32, grad_out.float())
    fast = _out_and_grads(lambda *t: attention(*t, causal=causal, impl=impl), q, k, v, grad_out)
    base = _out_and_grads(lambda *t: _attention_plain(*t, causal), q, k, v, grad_out)
    _assert_error_budget(impl, fast, base, oracle)
