"""Targets named on the command line: ``module:attribute``."""

from __future__ import annotations

import pytest

from choreo import App, ConfigurationError
from choreo.loader import load_apps


def test_app_list_and_factory_targets_all_load() -> None:
    """An App, a list of apps and a no-argument factory each give apps."""
    [demo_app, *_] = load_apps(["choreo.demo:build_order_apps"])
    assert isinstance(demo_app, App) and demo_app.name == "order_service"
    assert [a.name for a in load_apps(["tests.apps.shop:app"])] == ["shop"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module:app", "cannot import 'no_such_module:app'"),
        ("choreo.demo:missing", "has no attribute 'missing'"),
        ("choreo.loader:load_target", "cannot be called without arguments"),
        ("choreo.demo:PaymentDeclined", "is a type, not a choreo App"),
        ("choreo.demo:__doc__", "is a str, not a choreo App"),
    ],
)
def test_bad_targets_are_one_clear_error_naming_the_target(target: str, message: str) -> None:
    """Whatever is wrong with a target, the error names it."""
    with pytest.raises(ConfigurationError, match=message):
        load_apps([target])
