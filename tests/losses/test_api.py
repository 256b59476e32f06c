"""The public loss API: fastenc.losses exports the three losses and their `_ref` twins, every loss defaults to
impl="auto" (the fastest implementation for the inputs' device, not the O(B^2) reference), and a call without `impl`
computes the reference's value and gradients."""

import inspect

import pytest
import torch

import fastenc.losses
from fastenc.losses import clip_loss, clip_loss_ref, dino_loss, dino_loss_ref, siglip_loss, siglip_loss_ref
from fastenc.losses.contrastive import _CLIP_IMPLS
from fastenc.losses.dino import _DINO_IMPLS
from fastenc.losses.dispatch import resolve_impl
from fastenc.losses.sigmoid import _SIGLIP_IMPLS
from tests.losses.helpers import unit_features, value_and_grads

LOSSES = {"clip_loss": clip_loss, "siglip_loss": siglip_loss, "dino_loss": dino_loss}
REGISTRIES = {"clip_loss": _CLIP_IMPLS, "siglip_loss": _SIGLIP_IMPLS, "dino_loss": _DINO_IMPLS}


def _dino_inputs(C=4, G=2, B=3, K=33):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(C * B, K, generator=g) * 2
    teacher = torch.randn(G * B, K, generator=g) * 2
    center = torch.randn(1, K, generator=g) * 0.1
    return student, teacher, center


def _cases():
    """{loss: (call without impl, its `_ref` twin, differentiable inputs)}; fp32 CPU tensors."""
    img, txt = unit_features(13, 20)
    t, b = torch.tensor(14.3), torch.tensor(-10.0)
    student, teacher, center = _dino_inputs()
    return {
        "clip_loss": (clip_loss, clip_loss_ref, (img, txt, t)),
        "siglip_loss": (siglip_loss, siglip_loss_ref, (img, txt, t, b)),
        "dino_loss": (lambda s: dino_loss(s, teacher, center), lambda s: dino_loss_ref(s, teacher, center),
                      (student,)),
    }


@pytest.mark.parametrize("name", ["clip_loss", "siglip_loss", "dino_loss"])
def test_exported_with_ref_twin(name):
    for export in (name, f"{name}_ref"):
        assert export in fastenc.losses.__all__
        assert callable(getattr(fastenc.losses, export))


@pytest.mark.parametrize("name", LOSSES)
def test_default_impl_is_auto(name):
    param = inspect.signature(LOSSES[name]).parameters["impl"]
    assert param.default == "auto"
    assert param.kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", LOSSES)
def test_auto_on_cpu_is_the_fastest_usable(name):
    """On CPU "auto" is the C++ extension where it is built (the reference only where it is not)."""
    from fastenc.utils.optional import is_available

    want = "native" if is_available("fastenc._C") else "reference"
    assert resolve_impl(name, "auto", REGISTRIES[name], "cpu") is REGISTRIES[name][want].fn


@pytest.mark.parametrize("name", LOSSES)
def test_call_without_impl_matches_reference(name):
    default, ref, inputs = _cases()[name]
    got = value_and_grads(default, *inputs)
    want = value_and_grads(ref, *inputs)
    # fp32: the implementations differ only in summation order (a few ulp of the logits); measured <= 1e-6.
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} output {i}: {m}")
