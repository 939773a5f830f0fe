"""Handler parameters: what a handler asks for, and how each is filled.

A parameter annotated with an attrs class receives that class built from the
payload, whatever its name; any other parameter is injected by its name
(``INJECTABLE``). ``inspect_params`` works this out once, at registration;
``handler_arguments`` applies it on every call.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from choreo.errors import ConfigurationError
from choreo.events import Event
from choreo.payloads import build_payload

if TYPE_CHECKING:
    from choreo.context import Context

__all__ = ("INJECTABLE", "Param", "handler_arguments", "inspect_params")

#: Parameter names a handler can ask for, and what it receives.
INJECTABLE = ("data", "event", "ctx", "saga_id", "correlation_id")


@attrs.frozen
class Param:
    """How one handler parameter is filled: an injectable name or an attrs class."""

    name: str
    source: str  # one of INJECTABLE, or "model"
    model: type[Any] | None = None


def inspect_params(handler: Callable[..., Any]) -> tuple[Param, ...]:
    """Work out how to call ``handler``.

    A parameter annotated with an attrs class (other than ``Event``) receives
    that class built from the payload, whatever its name (``data`` included:
    the annotation wins); any other parameter is injected by its name.

    Raises:
        ConfigurationError: a parameter is neither injectable by name nor
            annotated with an attrs class.
    """
    hints = _annotations(handler)
    params = []
    for parameter in inspect.signature(handler).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ConfigurationError(f"handler {handler.__qualname__}: *args/**kwargs cannot be injected")
        annotation = hints.get(parameter.name)
        if isinstance(annotation, type) and attrs.has(annotation) and annotation is not Event:
            params.append(Param(parameter.name, "model", annotation))
        elif parameter.name in INJECTABLE:
            params.append(Param(parameter.name, parameter.name))
        else:
            raise ConfigurationError(
                f"handler {handler.__qualname__}: cannot inject parameter {parameter.name!r}; "
                f"use one of {', '.join(INJECTABLE)} or annotate it with an attrs class"
            )
    return tuple(params)


def _annotations(handler: Callable[..., Any]) -> dict[str, Any]:
    """The handler's annotations, resolved where possible.

    ``typing.get_type_hints`` gives up on all of them if one does not resolve
    (``ctx: Context`` imported only under ``TYPE_CHECKING``); then each string
    annotation is resolved on its own, so ``order: Order`` beside it still
    names the class.
    """
    try:
        return typing.get_type_hints(handler)
    except Exception:
        pass
    raw = dict(getattr(handler, "__annotations__", None) or {})
    namespace = getattr(inspect.unwrap(handler), "__globals__", {})
    for name, annotation in raw.items():
        # Twice for a quoted annotation under ``from __future__ import annotations``.
        for _ in range(2):
            if isinstance(annotation, str):
                with contextlib.suppress(Exception):
                    annotation = eval(annotation, namespace)  # what get_type_hints does, one name at a time
        raw[name] = annotation
    return raw


def handler_arguments(params: Sequence[Param], event: Event, ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that call a handler with ``params`` for ``event``.

    ``data`` is the payload the handler sees (the event's data, or a part of it).

    Raises:
        PayloadValidationError: an attrs-typed parameter does not fit ``data``.
    """
    kwargs: dict[str, Any] = {}
    for param in params:
        source = param.source
        if source == "data":
            kwargs[param.name] = dict(data)
        elif source == "event":
            kwargs[param.name] = event
        elif source == "ctx":
            kwargs[param.name] = ctx
        elif source == "saga_id":
            kwargs[param.name] = event.saga_id
        elif source == "correlation_id":
            kwargs[param.name] = event.correlation_id
        else:
            assert param.model is not None
            kwargs[param.name] = build_payload(param.model, data)
    return kwargs
