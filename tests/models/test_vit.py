"""The ViT: timm weight compatibility and output parity, position-embedding resampling, drop path, activation
checkpointing, intermediates and pooling."""

import pytest
import timm
import torch

import fastenc.models.layers.block as block_module
import fastenc.models.vit as vit_module
from fastenc.models import create_vit
from fastenc.models.vit import VisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)  # the vit_test preset


def _randomize_(model):
    """Fill every parameter with random values (weights ~N(0, .02), norm gains ~1): cheaper than the timm init
    of a big model on 2 CPU cores, and no parameter is left at a value (0 or 1) that could hide a mix-up."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.02)
    return model


def _built_fast(build):
    """Construct on the meta device (no init cost) and materialize with random values."""
    with torch.device("meta"):
        model = build()
    return _randomize_(model.to_empty(device="cpu")).eval()


def _timm_on_meta(*args, **kwargs):
    """A timm model to load weights into with assign=True: skips timm's init, which the load replaces anyway."""
    with torch.device("meta"):
        return timm.create_model(*args, pretrained=False, **kwargs).eval()


def _assert_same(ours, theirs, what):
    # Both models run the same ops in the same order (timm also calls F.scaled_dot_product_attention), so fp32
    # results agree to rounding; measured differences are 0. 1e-5 of the output scale leaves room for a kernel
    # choice differing between versions without hiding a real mismatch (a wrong weight gives O(scale) errors).
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, atol=1e-5 * scale, rtol=0, msg=lambda m: f"{what}: {m}")


def _forward_and_features(model, x):
    """forward(x) and forward_features(x) from one pass (base at 224 px costs ~1 s per forward on 2 cores):
    both models' forward_features end in `norm`, so a hook on it sees exactly what forward_features returns."""
    captured = []
    handle = model.norm.register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        pooled = model(x)
    handle.remove()
    assert len(captured) == 1
    return pooled, captured[0]


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224"])
def test_ours_to_timm_encoder_parity(name):
    ours = _built_fast(lambda: create_vit(name, attn_impl="sdpa"))
    theirs = _timm_on_meta(name, num_classes=0)
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 3, 224, 224)
    pooled, tokens = _forward_and_features(ours, x)
    pooled_timm, tokens_timm = _forward_and_features(theirs, x)
    _assert_same(tokens, tokens_timm, "forward_features")
    _assert_same(pooled, pooled_timm, "forward")
    assert pooled.shape == (2, ours.embed_dim) and tokens.shape == (2, 1 + 14 * 14, ours.embed_dim)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224"])
def test_timm_to_ours_classifier_parity(name):
    theirs = _built_fast(lambda: timm.create_model(name, pretrained=False))  # num_classes=1000
    with torch.device("meta"):
        ours = create_vit(name, num_classes=1000, attn_impl="sdpa").eval()
    _timm_on_meta(name).load_state_dict(ours.state_dict(), strict=True, assign=True)  # ours -> timm, names only
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = ours(x)
        _assert_same(logits, theirs(x), "logits")
    assert logits.shape == (2, 1000)


@pytest.mark.parametrize("num_classes", [0, 1000])
def test_large_state_dict_matches_timm(num_classes):
    with torch.device("meta"):
        ours = create_vit("vit_large_patch14_224", num_classes=num_classes)
        theirs = timm.create_model("vit_large_patch14_224", pretrained=False, num_classes=num_classes)
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)


@pytest.mark.slow
def test_large_parity():
    ours = _built_fast(lambda: create_vit("vit_large_patch14_224", attn_impl="sdpa"))
    theirs = _timm_on_meta("vit_large_patch14_224", num_classes=0)
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        _assert_same(ours(x), theirs(x), "forward")


@pytest.mark.parametrize("global_pool,fc_norm", [("token", None), ("avg", None), ("avg", False), ("token", True)])
def test_pooling_and_fc_norm_follow_timm(global_pool, fc_norm):
    ours = VisionTransformer(**TINY, global_pool=global_pool, fc_norm=fc_norm, attn_impl="sdpa").eval()
    _randomize_(ours)
    theirs = timm.models.VisionTransformer(**TINY, num_classes=0, global_pool=global_pool, fc_norm=fc_norm).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _assert_same(ours(x), theirs(x), "forward")
        _assert_same(ours.forward_features(x), theirs.forward_features(x), "forward_features")


def test_pooling_picks_the_expected_tokens():
    x = torch.randn(2, 3, 32, 32)
    token = VisionTransformer(**TINY, global_pool="token").eval()
    with torch.no_grad():
        feats = token.forward_features(x)
        torch.testing.assert_close(token(x), feats[:, 0], atol=0, rtol=0)
    avg = VisionTransformer(**TINY, global_pool="avg").eval()
    _randomize_(avg)
    # timm semantics: with 'avg' the final LayerNorm moves after pooling (fc_norm) and forward_features is un-normed.
    assert isinstance(avg.norm, torch.nn.Identity) and "fc_norm.weight" in avg.state_dict()
    with torch.no_grad():
        tokens = avg.forward_features(x)
        torch.testing.assert_close(avg(x), avg.fc_norm(tokens[:, 1:].mean(dim=1)), atol=0, rtol=0)
        assert not torch.allclose(avg(x), avg.fc_norm(tokens.mean(dim=1)))  # the CLS token is excluded


def _loss_and_grads(model, x, seed=0):
    torch.manual_seed(seed)  # same DropPath masks in runs that are compared
    model.zero_grad()
    out_BD = model(x)
    # A fixed random projection, not out.square().sum(): the pooled features are LayerNorm outputs, whose sum of
    # squares is nearly constant, so its gradients would be mostly rounding noise (measured 1e-4 relative).
    weight_BD = torch.randn(out_BD.shape, generator=torch.Generator().manual_seed(123))
    loss = (out_BD * weight_BD).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_close(grads, expected, rel):
    for name, g in expected.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(grads[name], g, atol=rel * scale, rtol=0, msg=lambda m: f"{name}: {m}")


def test_math_and_sdpa_give_same_outputs_and_grads():
    model = create_vit("vit_test", attn_impl="math")
    x = torch.randn(3, 3, 32, 32)
    loss_math, grads_math = _loss_and_grads(model, x)
    model.set_attn_impl("sdpa")
    assert all(b.attn.attn_impl == "sdpa" for b in model.blocks)
    loss_sdpa, grads_sdpa = _loss_and_grads(model, x)
    # fp32: the two backends differ only in accumulation order; measured gradient differences are <= 7e-7 of
    # each gradient's scale (the same as either one's distance to an fp64 run), so 1e-5 is tight.
    torch.testing.assert_close(loss_sdpa, loss_math, atol=1e-5 * loss_math.abs().item(), rtol=0)
    _assert_grads_close(grads_sdpa, grads_math, rel=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        model.set_attn_impl("flash2")


def test_pos_embed_resampled_like_timm_for_other_sizes():
    cfg = dict(TINY, img_size=224, patch_size=16)
    ours = _randomize_(VisionTransformer(**cfg, attn_impl="sdpa")).eval()
    theirs = timm.models.VisionTransformer(**cfg, num_classes=0, dynamic_img_size=True).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        for hw in [(96, 96), (160, 160), (96, 160)]:
            x = torch.randn(2, 3, *hw)
            feats = ours.forward_features(x)
            assert feats.shape == (2, 1 + (hw[0] // 16) * (hw[1] // 16), 64)
            _assert_same(feats, theirs.forward_features(x), f"{hw}")


def test_native_size_does_not_resample(monkeypatch):
    ours = create_vit("vit_test").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours.norm(ours.blocks(torch.cat([ours.cls_token.expand(2, -1, -1), ours.patch_embed(x)], 1)
                                         + ours.pos_embed))

        def fail(*args, **kwargs):
            raise AssertionError("resample_abs_pos_embed called at the training size")

        monkeypatch.setattr(vit_module, "resample_abs_pos_embed", fail)
        torch.testing.assert_close(ours.forward_features(x), expected, atol=0, rtol=0)


def test_bad_image_size_is_explained():
    model = create_vit("vit_test")
    with pytest.raises(ValueError, match="30x32 is not a multiple of patch_size=8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"Expected images \[B, 3, H, W\]"):
        model(torch.randn(3, 32, 32))


def test_drop_path_is_stochastic_in_train_only():
    model = create_vit("vit_test", drop_path_rate=0.5)
    reference = timm.models.VisionTransformer(**TINY, num_classes=0, drop_path_rate=0.5)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == [getattr(b.drop_path1, "drop_prob", 0.0) for b in reference.blocks] == [0.0, 0.5]
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)


def test_grad_checkpointing_same_loss_and_grads(monkeypatch):
    calls = []

    def spy(fn, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(block_module, "checkpoint", spy)
    # drop_path > 0: checkpointing must restore the RNG state so the recomputed DropPath mask matches.
    model = create_vit("vit_test", drop_path_rate=0.3).train()
    x = torch.randn(4, 3, 32, 32)
    loss_off, grads_off = _loss_and_grads(model, x, seed=1)
    assert calls == []
    model.set_grad_checkpointing(True)
    loss_on, grads_on = _loss_and_grads(model, x, seed=1)
    assert calls == [False] * len(model.blocks)  # every block, never the reentrant variant
    # Recomputation repeats the same fp32 ops, so results are equal to rounding (measured: bitwise equal).
    torch.testing.assert_close(loss_on, loss_off, atol=0, rtol=1e-6)
    _assert_grads_close(grads_on, grads_off, rel=1e-6)
    model.eval()
    model(x)
    assert len(calls) == len(model.blocks)  # no checkpointing outside training


def test_forward_intermediates_match_block_outputs():
    model = create_vit("vit_cpu_patch8_64", depth=4, embed_dim=64).eval()
    x = torch.randn(2, 3, 64, 64)
    captured = {}
    handles = [model.blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
               for i in range(4)]
    with torch.no_grad():
        feats = model.forward_features(x)
        penultimate, first, last = model.forward_intermediates(x, [-2, 0, 3])
    for h in handles:
        h.remove()
    assert penultimate.shape == (2, model.num_prefix_tokens + 64, 64)
    torch.testing.assert_close(penultimate, captured[2], atol=0, rtol=0)
    torch.testing.assert_close(first, captured[0], atol=0, rtol=0)
    torch.testing.assert_close(model.norm(last), feats, atol=0, rtol=0)  # raw outputs: the final norm is not applied
    with pytest.raises(IndexError, match=r"\[4\] are out of range for a ViT with 4 blocks"):
        model.forward_intermediates(x, [4])
    with pytest.raises(TypeError, match="list of block indices"):
        model.forward_intermediates(x, -2)


def test_no_weight_decay_names_exist():
    model = create_vit("vit_test")
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
