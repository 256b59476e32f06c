"""Objectives: one file per training objective, looked up by name in a registry.

An objective is an nn.Module that owns everything besides the shared vision encoder that its loss needs (text
tower, projections, logit scale, later a DINO teacher and center): batch dict in, (loss, metrics) out.
Register with `@register_objective("name")` (fastenc.objectives.registry) on the class; its `config_cls` types the
`objective:` section.
"""

from __future__ import annotations

import difflib

from fastenc.errors import ConfigError
from fastenc.objectives import clip, dino, llava, siglip  # noqa: F401  (importing registers the built-in objectives)
from fastenc.objectives.base import Objective, build_encoder
from fastenc.objectives.registry import REGISTRY, register_objective


def _lookup(name: str) -> type[Objective]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown objective '{name}'{hint} (registered: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def objective_config_class(name: str):
    """The config dataclass of the objective registered as `name`."""
    return _lookup(name).config_cls


def get_objective(name: str) -> type[Objective]:
    return _lookup(name)


def list_objectives() -> list[str]:
    return sorted(REGISTRY)


def build_objective(cfg) -> Objective:
    """Instantiate the objective named in cfg.objective with the shared encoder built from cfg.model."""
    return get_objective(cfg.objective.name)(cfg)


__all__ = [
    "Objective",
    "build_encoder",
    "build_objective",
    "get_objective",
    "list_objectives",
    "objective_config_class",
    "register_objective",
]
