"""impl selection, input checks and the single-process guard of distributed=True."""

import pytest
import torch

from fastenc.losses import LOSS_IMPLS, clip_loss, siglip_loss
from fastenc.losses.dispatch import Impl, resolve_impl
from fastenc.utils.optional import MissingDependency
from tests.losses.helpers import unit_features

LOSSES = {
    "clip_loss": lambda img, txt, **kw: clip_loss(img, txt, 14.3, **kw),
    "siglip_loss": lambda img, txt, **kw: siglip_loss(img, txt, 10.0, -10.0, **kw),
}


def test_loss_impls_names():
    assert LOSS_IMPLS[:2] == ("auto", "reference")


@pytest.mark.parametrize("loss", LOSSES)
def test_unknown_impl_lists_valid_choices(loss):
    img, txt = unit_features(3, 8)
    with pytest.raises(ValueError, match=rf"{loss}: unknown impl 'tritonn'; valid choices: 'auto', 'reference'"):
        LOSSES[loss](img, txt, impl="tritonn")


@pytest.mark.parametrize("loss", LOSSES)
def test_auto_equals_reference(loss):
    img, txt = unit_features(5, 8)
    assert torch.equal(LOSSES[loss](img, txt, impl="auto"), LOSSES[loss](img, txt, impl="reference"))


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
