"""Importing ``module:attribute`` targets named on the command line."""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from choreo.errors import ConfigurationError

if TYPE_CHECKING:
    from choreo.app import App

__all__ = ("load_apps", "load_target")


def load_target(target: str) -> object:
    """Import ``module:attribute`` (or ``module`` alone: its single App).

    Raises:
        ConfigurationError: naming the target, if it cannot be imported or found.
    """
    module_name, _, attribute = target.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: targets resolve from the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {target!r}: {exc}") from None
    except Exception as exc:
        raise ConfigurationError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from None
    if not attribute:
        from choreo.app import App

        found = [value for value in vars(module).values() if isinstance(value, App)]
        if len(found) != 1:
            raise ConfigurationError(f"{target!r} holds {len(found)} apps; name one as {module_name}:<app>")
        return found[0]
    value: object = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ConfigurationError(f"{target!r}: module {module_name!r} has no attribute {attribute!r}") from None
    return value


def load_apps(targets: list[str]) -> list[App]:
    """Load each target as an ``App``, a list/tuple of apps, or a factory
    called without arguments that returns either.

    Raises:
        ConfigurationError: a target is missing or is not an App.
    """
    from choreo.app import App

    apps: list[App] = []
    for target in targets:
        value = load_target(target)
        if callable(value) and not isinstance(value, App | type):
            # A factory (``module:build_apps``) that returns an App or a list of them.
            try:
                value = value()
            except TypeError as exc:
                message = f"{target!r} is a callable that cannot be called without arguments: {exc}"
                raise ConfigurationError(message) from None
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if not isinstance(item, App):
                raise ConfigurationError(f"{target!r} is a {type(item).__name__}, not a choreo App")
            apps.append(item)
    return apps
