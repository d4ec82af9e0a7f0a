"""A name -> class registry filled by a decorator, as timm's ``register_model`` (duplicates raise).

The experts (``experts/``) and the curriculum's stages (``curriculum/``) each keep one.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one kind by name.

    Args:
        kind: what the classes are, for messages ("expert", "curriculum stage").
        error: the exception an unknown or duplicate name raises (a ``ValueError``: one line).
    """

    def __init__(self, kind: str, error: type[ValueError] = ValueError) -> None:
        self.kind, self.error = kind, error
        self.classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator that registers ``cls`` under ``name``."""

        def add(cls: T) -> T:
            if name in self.classes:
                raise self.error(f"{self.kind} {name!r} is already registered by {self.classes[name].__qualname__}")
            self.classes[name] = cls
            return cls

        return add

    def unregister(self, name: str) -> None:
        self.classes.pop(name)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self.classes)

    def get(self, name: str) -> T:
        if name not in self.classes:
            raise self.error(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self.classes[name]
