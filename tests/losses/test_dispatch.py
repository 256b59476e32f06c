"""impl selection, input checks and the single-process guard of distributed=True."""

import warnings

import pytest
import torch

from fastenc.losses import LOSS_IMPLS, clip_loss, siglip_loss
from fastenc.losses.dispatch import Impl, lazy, resolve_impl
from fastenc.utils.optional import MissingDependency
from tests.losses.helpers import unit_features

LOSSES = {
    "clip_loss": lambda img, txt, **kw: clip_loss(img, txt, 14.3, **kw),
    "siglip_loss": lambda img, txt, **kw: siglip_loss(img, txt, 10.0, -10.0, **kw),
}


def test_loss_impls_names():
    assert LOSS_IMPLS == ("auto", "reference", "chunked", "native", "triton")


@pytest.mark.parametrize("loss", LOSSES)
def test_unknown_impl_lists_valid_choices(loss):
    img, txt = unit_features(3, 8)
    choices = "'auto', 'triton', 'native', 'reference', 'chunked'"
    with pytest.raises(ValueError, match=rf"{loss}: unknown impl 'tritonn'; valid choices: {choices}"):
        LOSSES[loss](img, txt, impl="tritonn")


@pytest.mark.parametrize("loss", LOSSES)
def test_auto_on_cpu_is_native_when_built_else_reference(loss):
    """'auto' never picks the Triton interpreter on CPU; it takes the native extension if built, else the reference."""
    from fastenc.utils.optional import is_available

    img, txt = unit_features(5, 8)
    expected = "native" if is_available("fastenc._C") else "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time "native unavailable" warning
        assert torch.equal(LOSSES[loss](img, txt, impl="auto"), LOSSES[loss](img, txt, impl=expected))


def test_auto_skips_implementations_for_other_devices_without_warning(monkeypatch):
    monkeypatch.setattr("fastenc.utils.optional._warned", set())
    gpu, cpu, ref = (lambda: "gpu"), (lambda: "cpu"), (lambda: "ref")
    registry = {"triton": Impl(gpu, devices=("cuda",), interpretable=True), "native": Impl(cpu, devices=("cpu",)),
                "reference": Impl(ref)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("demo_loss", "auto", registry, "cpu") is cpu
        assert resolve_impl("demo_loss", "auto", registry, "cuda") is gpu
        assert resolve_impl("demo_loss", "auto", registry, torch.device("meta")) is ref


def test_explicit_impl_on_the_wrong_device_says_where_it_runs(monkeypatch):
    registry = {"triton": Impl(lambda: "gpu", devices=("cuda",), interpretable=True),
                "native": Impl(lambda: "cpu", devices=("cpu",)), "reference": Impl(lambda: "ref")}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"demo_loss\(impl='triton'\) runs on cuda tensors \(or cpu under "
                                         r"TRITON_INTERPRET=1, for tests\), got cpu tensors"):
        resolve_impl("demo_loss", "triton", registry, "cpu")
    with pytest.raises(ValueError, match=r"impl='native'\) runs on cpu tensors, got cuda tensors"):
        resolve_impl("demo_loss", "native", registry, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs kernels on CPU tensors: allowed when asked
    assert resolve_impl("demo_loss", "triton", registry, "cpu")() == "gpu"
    assert resolve_impl("demo_loss", "auto", registry, "cpu")() == "cpu"  # but never chosen automatically


def test_lazy_imports_on_first_call_only():
    import sys

    fn = lazy("fastenc.losses.chunked", "rows_per_chunk")
    assert fn(None, 4 * 2**20, "x") == 4 and fn(3, 8, "x") == 3
    with pytest.raises(ModuleNotFoundError):
        lazy("fastenc_test_no_such_module", "f")()
    assert "fastenc_test_no_such_module" not in sys.modules


def test_auto_skips_missing_fast_path_with_one_warning_and_explicit_request_raises(monkeypatch):
    monkeypatch.setattr("fastenc.utils.optional._warned", set())  # warn_once state is per process
    fast, ref = (lambda: "fast"), (lambda: "ref")
    registry = {"triton": Impl(fast, requires="fastenc_test_no_such_module"), "reference": Impl(ref)}
    with pytest.warns(UserWarning, match="impl .triton. unavailable"):
        assert resolve_impl("demo_loss", "auto", registry) is ref
    with pytest.raises(MissingDependency, match=r"demo_loss\(impl='triton'\)"):
        resolve_impl("demo_loss", "triton", registry)


@pytest.mark.parametrize("loss", LOSSES)
def test_shape_errors_are_explained(loss):
    img, txt = unit_features(4, 8)
    with pytest.raises(ValueError, match=r"must have the same shape \[B, D\]"):
        LOSSES[loss](img, txt[:3])
    with pytest.raises(ValueError, match=r"image_features must be a non-empty \[B, D\] tensor, got \(8,\)"):
        LOSSES[loss](img[0], txt)
    with pytest.raises(ValueError, match="logit_scale must be a python number or a one-element tensor"):
        clip_loss(img, txt, torch.ones(2)) if loss == "clip_loss" else siglip_loss(img, txt, torch.ones(2), 0.0)


@pytest.mark.parametrize("loss", LOSSES)
def test_distributed_without_process_group_says_what_to_do(loss):
    img, txt = unit_features(4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        LOSSES[loss](img, txt, distributed=True)


def test_mixed_dtypes_are_refused():
    img, txt = unit_features(4, 8)
    with pytest.raises(ValueError, match="features must share a dtype"):
        clip_loss(img, txt.bfloat16(), 14.3)
