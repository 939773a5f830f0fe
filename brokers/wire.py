"""Compact JSON text for the hot paths (event envelopes, commit headers).

``json.dumps`` with options builds a new encoder on every call, and even a
kept ``JSONEncoder`` builds its C encoder on every ``encode``; ``dumps`` here
builds it once. Output is what ``json.dumps(value, ensure_ascii=False,
allow_nan=False, separators=(",", ":"))`` gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from brokers.speedups import remember

__all__ = ("dumps", "quote", "quote_name")


def _not_json(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_c_make_encoder: Callable[..., Callable[[Any, int], Sequence[str]]] | None = getattr(
    json.encoder, "c_make_encoder", None
)

if _c_make_encoder is not None:
    # No markers dict: the cycle check is skipped, and a cycle ends in
    # RecursionError instead of ValueError.
    _encode = _c_make_encoder(None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False)

    def dumps(value: Any) -> str:
        """Compact JSON for ``value``.

        Raises:
            TypeError: a value JSON cannot hold (a set, an object...).
            ValueError: NaN or an infinity.
            RecursionError: a cycle, or nesting deeper than the interpreter allows.
        """
        return "".join(_encode(value, 0))

else:  # pragma: no cover - CPython always has the C encoder
    _ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_not_json)

    def dumps(value: Any) -> str:
        """Compact JSON for ``value`` (see above)."""
        return _ENCODER.encode(value)


_encode_string: Callable[[str], str] = json.encoder.encode_basestring


def quote(value: str) -> str:
    """``value`` as a JSON string (``dumps`` for anything that is not a str)."""
    return _encode_string(value) if type(value) is str else dumps(value)


_quoted_names: dict[str, str] = {}


def quote_name(name: str) -> str:
    """``quote`` for names met on every call (topics, groups, keys): remembered."""
    quoted = _quoted_names.get(name)
    if quoted is None:
        quoted = remember(_quoted_names, name, quote(name))
    return quoted
