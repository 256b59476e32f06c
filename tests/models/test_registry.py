"""Presets of fastenc.models: names, overrides, and the messages for mistakes."""

import pytest
import torch

from fastenc.models import create_text_tower, create_vit, list_text_towers, list_vits


def test_presets_are_listed_and_build():
    assert set(list_vits()) == {"vit_test", "vit_cpu_patch8_64", "vit_cpu_patch16_64", "vit_small_patch16_224",
                                "vit_base_patch16_224", "vit_large_patch14_224"}
    assert set(list_text_towers()) == {"text_test", "text_cpu", "text_base"}
    with torch.device("meta"):  # shapes only: building the big presets for real would cost seconds
        for name in list_vits():
            model = create_vit(name)
            assert isinstance(model.head, torch.nn.Identity) and model.num_classes == 0
        for name in list_text_towers():
            tower = create_text_tower(name, vocab_size=1000, output_dim=128)
            assert tower.text_projection.weight.shape == (128, tower.width)


def test_cpu_preset_dimensions():
    with torch.device("meta"):
        model = create_vit("vit_cpu_patch8_64")
    assert (model.img_size, model.patch_size, model.embed_dim, len(model.blocks)) == (64, 8, 256, 6)
    assert model.blocks[0].attn.num_heads == 4 and model.pos_embed.shape == (1, 1 + 64, 256)


def test_classifier_override():
    model = create_vit("vit_test", num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_vit_name_suggests_the_closest():
    with pytest.raises(ValueError, match="Unknown ViT preset 'vit_base_patch16_244'. Did you mean 'vit_base_patch16_224'"):
        create_vit("vit_base_patch16_244")


def test_unknown_override_is_named():
    with pytest.raises(TypeError, match=r"Unknown ViT override\(s\) \['dropout_rate'\]"):
        create_vit("vit_test", dropout_rate=0.1)
    with pytest.raises(TypeError, match=r"\['hidden_size'\]"):
        create_text_tower("text_test", vocab_size=10, output_dim=8, hidden_size=32)


def test_text_tower_needs_vocab_and_output_dim():
    with pytest.raises(TypeError, match="vocab_size"):
        create_text_tower("text_test", output_dim=8)
    with pytest.raises(ValueError, match="Did you mean 'text_base'"):
        create_text_tower("text_bse", vocab_size=10, output_dim=8)


def test_text_base_matches_open_clip_vit_b_16():
    open_clip = pytest.importorskip("open_clip")
    cfg = open_clip.get_model_config("ViT-B-16")
    text_cfg = cfg["text_cfg"]
    with torch.device("meta"):
        ours = create_text_tower("text_base", vocab_size=text_cfg["vocab_size"], output_dim=cfg["embed_dim"])
        theirs = open_clip.transformer.TextTransformer(**text_cfg, output_dim=cfg["embed_dim"])
    assert (ours.context_length, ours.width, len(ours.blocks)) == (
        text_cfg["context_length"], text_cfg["width"], text_cfg["layers"])
    assert ours.blocks[0].attn.num_heads == text_cfg["heads"]
    # Same parameter count = same layer widths (MLP ratio, biases, projection) under different names.
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_cpu_models_never_query_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA was queried on the CPU path")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    create_vit("vit_test")(torch.randn(1, 3, 32, 32))  # attn_impl="auto"
    create_text_tower("text_test", vocab_size=10, output_dim=8)(torch.ones(1, 4, dtype=torch.long))
