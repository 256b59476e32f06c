"""The objective registry: name -> Objective class, filled by `@register_objective` (lookups: fastenc.objectives)."""

from __future__ import annotations

from fastenc.objectives.base import Objective

REGISTRY: dict[str, type[Objective]] = {}


def register_objective(name: str):
    def deco(cls: type[Objective]) -> type[Objective]:
        if name in REGISTRY:
            raise ValueError(f"objective '{name}' registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco
