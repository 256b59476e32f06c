"""Objectives: one file per training objective, looked up by name in a registry.

An objective is an nn.Module that owns everything besides the shared vision encoder that its loss needs (text
tower, projections, logit scale, later a DINO teacher and center): batch dict in, (loss, metrics) out.
Register with `@register_objective("name")` on the class; its `config_cls` types the `objective:` section.
"""

from __future__ import annotations

import difflib

from fastenc.objectives.base import Objective, build_encoder

_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(name: str):
    def deco(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY:
            raise ValueError(f"objective '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _lookup(name: str) -> type[Objective]:
    _import_builtin()
    if name not in _REGISTRY:
        from fastenc.config import ConfigError

        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown objective '{name}'{hint} (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def objective_config_class(name: str):
    """The config dataclass of the objective registered as `name`."""
    return _lookup(name).config_cls


def get_objective(name: str) -> type[Objective]:
    return _lookup(name)


def list_objectives() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def build_objective(cfg) -> Objective:
    """Instantiate the objective named in cfg.objective with the shared encoder built from cfg.model."""
    return get_objective(cfg.objective.name)(cfg)


def _import_builtin():
    # Importing registers them; kept lazy so `fastenc.config` can import this module without cycles.
    from fastenc.objectives import clip, dino, siglip  # noqa: F401


__all__ = [
    "Objective",
    "build_encoder",
    "build_objective",
    "get_objective",
    "list_objectives",
    "objective_config_class",
    "register_objective",
]
