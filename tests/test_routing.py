"""The routing table: registration, validation and inspection."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

import choreo
from choreo import App, ConfigurationError, Route, Router, emits


def test_decorators_return_the_handler_unchanged_in_either_order() -> None:
    """A handler stays a plain function a unit test can call, whatever the decorator order."""
    app = App("svc")

    async def first(data: dict[str, Any]) -> None: ...
    async def second(data: dict[str, Any]) -> None: ...

    assert app.on_event("a.x")(app.emits("b.x", "b.failed")(first)) is first
    assert app.emits("c.x", "c.failed")(app.on_event("a.x")(second)) is second
    by_name = {r.name: r for r in app.routes}
    assert by_name["first"].emits == ("b.x", "b.failed")
    assert by_name["second"].emits == ("c.x", "c.failed")


def test_routes_are_frozen_records_describing_the_table() -> None:
    """app.routes lists Route records with event, service, name, handler, emits and group."""
    app = App("inventory_service")

    @app.on_event("order.created", retries=5, timeout=2.0)
    @app.emits("inventory.reserved", "inventory.insufficient")
    async def reserve_inventory(data: dict[str, Any]) -> None: ...

    [route] = app.routes
    assert isinstance(route, Route)
    assert (route.event, route.service, route.name, route.handler) == (
        "order.created", "inventory_service", "reserve_inventory", reserve_inventory,
    )
    assert route.emits == ("inventory.reserved", "inventory.insufficient")
    assert route.group == "inventory_service.reserve_inventory"
    assert (route.retries, route.timeout) == (5, 2.0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        route.retries = 1  # type: ignore[misc]


def test_one_function_can_take_several_events_under_different_names() -> None:
    """Stacked on_event with names give one route per event."""
    app = App("svc")

    @app.on_event("a.failed", name="on_a")
    @app.on_event("b.failed", name="on_b")
    @app.emits("cleanup.done")
    async def cleanup(data: dict[str, Any]) -> None: ...

    assert sorted((r.event, r.group, r.emits) for r in app.routes) == [
        ("a.failed", "svc.on_a", ("cleanup.done",)),
        ("b.failed", "svc.on_b", ("cleanup.done",)),
    ]


@pytest.mark.parametrize(
    ("register", "message"),
    [
        (lambda app: app.on_event("bad name"), "invalid event type"),
        (lambda app: app.on_event("a.x", retries=-1), "retries"),
        (lambda app: app.on_event("a.x", timeout=0), "timeout"),
        (lambda app: app.on_event("a.x", concurrency=0), "concurrency"),
        (lambda app: app.on_event("a.x", name="has space"), "handler name"),
    ],
)
def test_bad_registrations_fail_at_decoration_time(register: Any, message: str) -> None:
    """Invalid names and options are configuration errors raised eagerly."""
    app = App("svc")

    async def handler(data: dict[str, Any]) -> None: ...

    with pytest.raises(ConfigurationError, match=message):
        register(app)(handler)


def test_duplicate_handler_for_same_event_is_refused() -> None:
    """Two handlers with one name on one event would share a group: refused."""
    app = App("svc")

    async def handler(data: dict[str, Any]) -> None: ...

    app.on_event("a.x")(handler)
    with pytest.raises(ConfigurationError, match="already has a handler"):
        app.on_event("a.x")(handler)


def test_parameters_that_cannot_be_injected_are_refused_at_registration() -> None:
    """Only injectable names or attrs-typed parameters are allowed."""
    app = App("svc")

    async def handler(data: dict[str, Any], database: object) -> None: ...

    with pytest.raises(ConfigurationError, match="database"):
        app.on_event("a.x")(handler)


def test_emits_rejects_invalid_and_duplicate_names() -> None:
    """@emits validates what it declares."""
    with pytest.raises(ConfigurationError):
        emits("not valid!")
    app = App("svc")

    async def handler(data: dict[str, Any]) -> None: ...

    with pytest.raises(ConfigurationError, match="twice"):
        app.on_event("a.x")(emits("b.x", "b.x")(handler))


def test_routers_group_handlers_defined_elsewhere() -> None:
    """A Router collects handlers in a module; include_router adds them to a service."""
    router = Router("tmp")

    @router.on_event("a.x")
    async def handler(data: dict[str, Any]) -> None: ...

    app = App("svc")
    app.include_router(router)
    assert [r.group for r in app.routes] == ["svc.handler"]


def test_service_names_are_validated() -> None:
    """A service name becomes part of group names, so it must be safe."""
    with pytest.raises(ConfigurationError):
        App("bad name")


def test_public_names_are_exported_explicitly() -> None:
    """choreo.__all__ is a tuple naming exactly the public API, each importable."""
    assert isinstance(choreo.__all__, tuple)
    for name in choreo.__all__:
        assert getattr(choreo, name) is not None
    for name in ("App", "Emit", "Event", "EmitNotDeclared", "ConfigurationError", "DeadLetter", "Route", "run"):
        assert name in choreo.__all__
    public = {n for n in dir(choreo) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(choreo.__all__)


def test_brokers_package_does_not_import_choreo_or_redis() -> None:
    """The transport layer is importable on its own and loads redis only when asked."""
    import subprocess
    import sys

    code = "import sys, brokers; assert 'choreo' not in sys.modules; assert 'redis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
