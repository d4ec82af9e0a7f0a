"""The expert registry: ``@register_expert(name)`` fills it, ``create_expert`` builds from it.

Every expert module is imported explicitly at the bottom of this file, so the registry is
complete as soon as the package is imported.
"""

from __future__ import annotations

from typing import Any, Callable

from mgmoe_ds.experts.base import Expert, ExpertOutput

_EXPERTS: dict[str, type[Expert]] = {}


class ExpertError(ValueError):
    """A user-caused expert configuration error, in one line."""


def register_expert(name: str) -> Callable[[type[Expert]], type[Expert]]:
    """Class decorator that registers an ``Expert`` subclass under ``name``; duplicates raise."""

    def add(cls: type[Expert]) -> type[Expert]:
        if name in _EXPERTS:
            raise ExpertError(f"expert {name!r} is already registered by {_EXPERTS[name].__qualname__}")
        _EXPERTS[name] = cls
        return cls

    return add


def list_experts() -> list[str]:
    """Registered expert names, sorted."""
    return sorted(_EXPERTS)


def expert_class(name: str) -> type[Expert]:
    if name not in _EXPERTS:
        raise ExpertError(f"unknown expert {name!r}; registered: {', '.join(list_experts())}")
    return _EXPERTS[name]


def create_expert(name: str, *, info, num_classes: int, **options: Any) -> Expert:
    """Builds a registered expert on a backbone.

    Args:
        name: a name from ``list_experts()``.
        info: the backbone's ``BackboneInfo``.
        num_classes: classes to predict.
        **options: overrides of the expert's ``default_options`` (the caller wins).

    Returns:
        The expert module.
    """
    cls = expert_class(name)
    for option in options:
        if option not in cls.default_options:
            raise ExpertError(
                f"expert {name!r}: unknown option {option!r}; accepted: {', '.join(sorted(cls.default_options))}"
            )
    return cls(info=info, num_classes=num_classes, **dict(cls.default_options, **options))


# Imported for their registration side effect, explicitly, one per expert.
from mgmoe_ds.experts import mlp, mpsa, pim, pmg, transfg  # noqa: E402,F401

__all__ = ["Expert", "ExpertOutput", "ExpertError", "create_expert", "list_experts", "register_expert", "expert_class"]
