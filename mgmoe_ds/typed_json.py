"""Strict construction of frozen dataclasses from JSON values, with one-line errors.

An unknown key, a missing one, a wrong type or an out-of-range value (a dataclass's own check
raising :class:`RangeError`) is a :class:`ConfigError` whose message names the source (a file),
the key path, the value and what is accepted. ``typing`` annotations say what is accepted:
``int``, ``float``, ``bool``, ``str``, ``Optional``/unions, ``Literal``, ``list``, ``dict``,
``tuple`` (a JSON list of a fixed length, or any length for ``tuple[T, ...]``) and nested
dataclasses. A dataclass may have a short form (``SHORT_FORMS``: e.g. an expert given by name
alone) and a check after it is built (``CHECKS``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Callable, Literal, Optional, TypeVar, Union

SHORT_FORMS: dict[type, Callable[[Any], Any]] = {}  # dataclass -> its JSON value's short form made long
CHECKS: dict[type, Callable[[Any, str, str], None]] = {}  # dataclass -> check(built, key, source)


class ConfigError(ValueError):
    """A user-caused configuration error; its message is one line naming file, key and value."""


class RangeError(ConfigError):
    """An out-of-range field, raised by a config dataclass's own checks (an expert's options ``validate``).

    It names the field only; the loader that built the dataclass re-raises it with the file and the key path.
    """

    def __init__(self, key: str, value: Any, accepted: str) -> None:
        self.key, self.value, self.accepted = key, value, accepted
        super().__init__(f"{key} = {_shown(value)}: expected {accepted}")


_PLURALS = {"integer": "integers", "number": "numbers", "string": "strings", "object": "objects",
            "true/false": "true/false values", "any": "values"}


def _plural(annotation: Any) -> str:
    """The accepted type of a list's items, in words: "integers", "objects"."""
    name = type_name(annotation)
    return _PLURALS.get(name, name)


def _tuple_items(annotation: Any, length: int) -> Optional[tuple[Any, ...]]:
    """The item types of a ``tuple[...]`` annotation for a value of ``length`` items; None if the length is wrong."""
    args = typing.get_args(annotation)
    if args[1:] == (Ellipsis,):  # tuple[int, ...]: any length
        return (args[0],) * length
    return args if len(args) == length else None


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_plural(typing.get_args(annotation)[0])}"
    if origin is tuple:  # JSON has no tuples: a list of a fixed length (or any length for tuple[T, ...])
        args = typing.get_args(annotation)
        if args[1:] == (Ellipsis,):
            return f"list of {_plural(args[0])}"
        if len(set(args)) == 1:
            return f"list of {len(args)} {_plural(args[0])}"
        return f"list of [{', '.join(type_name(a) for a in args)}]"
    if origin is dict:
        value_type = typing.get_args(annotation)[1]
        return "object" if value_type is Any else f"object of {_plural(value_type)}"
    if annotation is type(None):
        return "null"
    if dataclasses.is_dataclass(annotation):
        return "object"
    if annotation is Any:
        return "any"
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(annotation, str(annotation))


def _shown(value: Any) -> str:
    shown = json.dumps(value) if not isinstance(value, str) else repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def fail(source: str, key: str, value: Any, accepted: str) -> ConfigError:
    return ConfigError(f"{source}: {key} = {_shown(value)}: expected {accepted}")


def convert(annotation: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise fail(source, key, value, type_name(annotation))
    if origin in (Union, types.UnionType):
        telling = None  # an object's own error (an unknown key inside it) says more than "object or null"
        for option in typing.get_args(annotation):
            try:
                return convert(option, value, key, source)
            except ConfigError as error:
                if isinstance(value, dict) and dataclasses.is_dataclass(option):
                    telling = error
        raise telling or fail(source, key, value, type_name(annotation))
    if annotation is type(None):
        if value is None:
            return None
        raise fail(source, key, value, "null")
    if origin is list:
        if not isinstance(value, list):
            raise fail(source, key, value, type_name(annotation))
        (item_type,) = typing.get_args(annotation)
        return [convert(item_type, item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is tuple:
        item_types = _tuple_items(annotation, len(value)) if isinstance(value, (list, tuple)) else None
        if item_types is None:
            raise fail(source, key, value, type_name(annotation))
        return tuple(convert(t, item, f"{key}[{i}]", source) for i, (t, item) in enumerate(zip(item_types, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(source, key, value, type_name(annotation))
        _, value_type = typing.get_args(annotation)
        return {str(k): convert(value_type, v, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, key, source)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise fail(source, key, value, "true/false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail(source, key, value, "integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail(source, key, value, "number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise fail(source, key, value, "string")
    raise TypeError(f"config field {key} has an unsupported annotation {annotation!r}")


def build_dataclass(cls: type, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        return value
    if cls in SHORT_FORMS:
        value = SHORT_FORMS[cls](value)
    if not isinstance(value, dict):
        raise fail(source, key, value, "object")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        prefix = f"{key}." if key else ""
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]}; accepted keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        sub_key = f"{key}.{name}" if key else name
        if name in value:
            kwargs[name] = convert(hints[name], value[name], sub_key, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {sub_key}")
    try:
        built = cls(**kwargs)
    except RangeError as err:  # the dataclass's own check names the field only
        raise fail(source, f"{key}.{err.key}" if key else err.key, err.value, err.accepted) from None
    if cls in CHECKS:
        CHECKS[cls](built, key, source)
    return built


T = TypeVar("T")


def options_from_dict(options_class: type[T], options: dict[str, Any], source: str, key: str = "") -> T:
    """Builds a typed options dataclass from plain values, as strictly as the run config itself.

    The one checker behind both the run config's ``model.experts[i].options`` and ``create_expert``.

    Args:
        options_class: a frozen dataclass whose fields all have defaults (an expert's ``options_class``).
        options: field values as JSON gives them (a list for a tuple); absent fields keep their defaults.
        source: where the values come from, first in an error message (a file, or "expert 'pim'").
        key: the key path of ``options`` in that source; "" for none.

    Returns:
        The options, with the caller's values over the defaults.

    Raises:
        ConfigError: one line naming the source, the key, the value and what is accepted, on an unknown
            key, a wrong type or an out-of-range value.
    """
    return build_dataclass(options_class, options, key, source)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``key.path=value`` (value as JSON, else a plain string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. moe.top_k=1")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().removeprefix("mgmoe.").split("."), value


def apply_overrides(block: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of ``block`` with ``--set key=value`` overrides applied.

    Unknown keys are caught when the result is validated by ``config_from_dict``; the error then
    names the key exactly as given.
    """
    result = json.loads(json.dumps(block))
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result
