"""Model towers and their named presets.

`create_vit(name, **overrides)` and `create_text_tower(name, vocab_size=..., output_dim=..., **overrides)` build
from a preset; overrides replace any constructor argument. The timm-named ViT presets use the same
hyperparameters as timm's models of those names, so their weights load both ways.
"""

from __future__ import annotations

import difflib
import inspect

from fastenc.models.text import TextTransformer
from fastenc.models.vit import VisionTransformer

_VIT_PRESETS: dict[str, dict] = {
    # Unit tests: 16 patch tokens, runs in milliseconds.
    "vit_test": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4),
    # The CPU recipe model: 64 px images, 64 patch tokens.
    "vit_cpu_patch8_64": dict(img_size=64, patch_size=8, embed_dim=256, depth=6, num_heads=4),
    "vit_cpu_patch16_64": dict(img_size=64, patch_size=16, embed_dim=256, depth=6, num_heads=4),
    "vit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
}

_TEXT_PRESETS: dict[str, dict] = {
    "text_test": dict(context_length=16, width=64, layers=2, heads=4),
    "text_cpu": dict(context_length=32, width=256, layers=4, heads=4),
    # open_clip ViT-B-16's text tower.
    "text_base": dict(context_length=77, width=512, layers=12, heads=8, mlp_ratio=4.0),
}


def _build(kind: str, presets: dict[str, dict], cls: type, name: str, overrides: dict):
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown {kind} preset {name!r}.{hint} Available: {', '.join(presets)}.")
    valid = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"Unknown {kind} override(s) {unknown} for preset {name!r}; "
                        f"valid keys: {', '.join(sorted(valid))}.")
    return cls(**{**presets[name], **overrides})


def list_vits() -> list[str]:
    return list(_VIT_PRESETS)


def list_text_towers() -> list[str]:
    return list(_TEXT_PRESETS)


def create_vit(name: str, **overrides) -> VisionTransformer:
    """Build a ViT preset. Defaults to an encoder (num_classes=0); pass num_classes=K for a classifier."""
    return _build("ViT", _VIT_PRESETS, VisionTransformer, name, overrides)


def load_vit(path: str, model: str | None = None) -> VisionTransformer:
    """A ViT in eval mode from a timm-format .safetensors file (safe load: no pickle), built from the file's
    metadata when fastenc exported it, or from preset `model` for any other timm ViT file (a classifier's `head.*`
    is dropped)."""
    from safetensors.torch import load_file

    name, kwargs = _vit_from_metadata(path, model)
    encoder = create_vit(name, **kwargs)
    state = load_file(path)
    if any(k.startswith("head.") for k in state) and not any(k.startswith("head.") for k in encoder.state_dict()):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a timm classifier: its trunk
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def _vit_from_metadata(path: str, model: str | None) -> tuple[str, dict]:
    """The ViT preset and its kwargs from a fastenc export's metadata (or `model` for any timm-format file)."""
    import yaml
    from safetensors import safe_open

    if model is not None:
        return model, {}
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "model" not in meta:
        raise ValueError(f"{path} has no 'model' metadata (it was not exported by fastenc): pass --model with its "
                         "ViT preset, e.g. --model vit_base_patch16_224 (`fastenc models` lists them)")
    kwargs = {}
    if "fastenc_config" in meta:
        mcfg = yaml.safe_load(meta["fastenc_config"]).get("model", {})
        kwargs.update(mcfg.get("overrides") or {})
        if mcfg.get("img_size"):
            kwargs["img_size"] = mcfg["img_size"]
        kwargs["global_pool"] = mcfg.get("global_pool", "token")
    return meta["model"], kwargs


def create_text_tower(name: str, *, vocab_size: int, output_dim: int, **overrides) -> TextTransformer:
    """Build a text tower preset. vocab_size (the tokenizer's) and output_dim (the shared embedding size) are
    always the caller's."""
    return _build("text tower", _TEXT_PRESETS, TextTransformer, name,
                  {"vocab_size": vocab_size, "output_dim": output_dim, **overrides})


__all__ = ["TextTransformer", "VisionTransformer", "create_text_tower", "create_vit", "list_text_towers",
           "list_vits", "load_vit"]
