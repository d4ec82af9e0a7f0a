"""The expert registry: ``@register_expert(name)`` fills it, ``create_expert`` builds from it.

Every expert module is imported explicitly at the bottom of this file, so the registry is
complete as soon as the package is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from mgmoe_ds.typed_json import ConfigError, options_from_dict
from mgmoe_ds.experts.base import Expert, ExpertOptions, ExpertOutput
from mgmoe_ds.registry import Registry

class ExpertError(ValueError):
    """A user-caused expert configuration error, in one line."""


EXPERTS: Registry[type[Expert]] = Registry("expert", ExpertError)


def register_expert(name: str) -> Callable[[type[Expert]], type[Expert]]:
    """Class decorator that registers an ``Expert`` subclass under ``name``; duplicates raise."""
    return EXPERTS.register(name)


def list_experts() -> list[str]:
    """Registered expert names, sorted."""
    return EXPERTS.names()


def expert_class(name: str) -> type[Expert]:
    return EXPERTS.get(name)


def create_expert(name: str, *, info, num_classes: int, **options: Any) -> Expert:
    """Builds a registered expert on a backbone.

    Args:
        name: a name from ``list_experts()``.
        info: the backbone's ``BackboneInfo``.
        num_classes: classes to predict.
        **options: fields of the expert's ``options_class``, over its defaults (the caller wins); plain
            values as in the run config (a list for a tuple) or Python ones.

    Returns:
        The expert module.

    Raises:
        ExpertError: one line, on an unknown name, an unknown option, a wrong type or an out-of-range value.
    """
    cls = expert_class(name)
    try:
        chosen = options_from_dict(cls.options_class, options, source=f"expert {name!r}")
    except ConfigError as err:
        raise ExpertError(str(err)) from None
    return cls(info=info, num_classes=num_classes, **dataclasses.asdict(chosen))


# Imported for their registration side effect, explicitly, one per expert.
from mgmoe_ds.experts import mlp, mpsa, pim, pmg, transfg  # noqa: E402,F401

__all__ = ["Expert", "ExpertOptions", "ExpertOutput", "ExpertError", "create_expert", "list_experts", "register_expert",
           "expert_class"]
