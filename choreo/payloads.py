"""Handler parameters typed with attrs classes, built from an event's payload.

``async def ship(order: Order)`` receives ``Order`` built from the payload's
matching keys (extra keys ignored). A missing field or a value of the wrong
type is a ``PayloadValidationError`` naming the field: a message that cannot be
fixed by retrying, so it is dead-lettered at once.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import attrs

from choreo.errors import PayloadValidationError

__all__ = ("build_payload",)

_NoneType = type(None)


def _check(value: Any, expected: Any, path: str) -> Any:
    """Return ``value`` converted for ``expected`` (nested attrs classes), or raise."""
    if expected is Any or expected is None or isinstance(expected, typing.TypeVar):
        return value
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and _NoneType in options:
            return None
        errors = []
        for option in options:
            if option is _NoneType:
                continue
            try:
                return _check(value, option, path)
            except PayloadValidationError as exc:
                errors.append(str(exc))
        raise PayloadValidationError(errors[0] if len(errors) == 1 else f"field {path!r} matches none of {expected}")
    if origin is typing.Literal:
        if value not in typing.get_args(expected):
            raise PayloadValidationError(f"field {path!r} must be one of {typing.get_args(expected)}, got {value!r}")
        return value
    if origin is not None:
        if origin in (list, tuple, set, frozenset, typing.Sequence) and isinstance(value, list):
            return value if origin is list else origin(value)
        if origin in (dict, typing.Mapping) and isinstance(value, dict):
            return value
        raise PayloadValidationError(f"field {path!r} must be {_name(origin)}, got {_name(type(value))}")
    if isinstance(expected, type) and attrs.has(expected):
        if not isinstance(value, dict):
            raise PayloadValidationError(f"field {path!r} must be an object, got {_name(type(value))}")
        return build_payload(expected, value, prefix=f"{path}.")
    if expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(expected, type):
        if isinstance(value, expected):
            return value
        if expected in (tuple, set, frozenset) and isinstance(value, list):
            return expected(value)
    else:
        return value  # a type we cannot check cheaply: trust it
    raise PayloadValidationError(f"field {path!r} must be {_name(expected)}, got {_name(type(value))}")


def _name(kind: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
            list: "a list", _NoneType: "null"}.get(kind, getattr(kind, "__name__", str(kind)))


def build_payload(cls: type[Any], data: dict[str, Any], *, prefix: str = "") -> Any:
    """Build an attrs instance of ``cls`` from ``data``.

    Raises:
        PayloadValidationError: a required field is missing, a value has the
            wrong type, or a validator of ``cls`` refused it.
    """
    attrs.resolve_types(cls)
    kwargs: dict[str, Any] = {}
    for field in attrs.fields(cls):
        if not field.init:
            continue
        key = field.alias or field.name
        path = f"{prefix}{field.name}"
        if key not in data:
            if field.default is attrs.NOTHING:
                raise PayloadValidationError(f"missing field {path!r} for {cls.__name__}")
            continue
        kwargs[key] = _check(data[key], field.type, path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PayloadValidationError(f"invalid {cls.__name__}: {exc}") from None
