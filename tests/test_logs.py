"""Correlated logs: every record written while handling an event carries its ids."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from choreo import App, Context
from choreo.logs import CorrelationFilter, JsonFormatter, configure_logging, current
from choreo.testing import run_apps


@pytest.fixture(autouse=True)
def keep_root_level() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = configure_logging("INFO", "json", stream)
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_any_logger_inside_a_handler_gets_the_event_ids(captured: io.StringIO) -> None:
    app = App("logger_service")
    library = logging.getLogger("some.library")

    @app.on_event("thing.happened")
    async def async_handler(data: dict[str, Any]) -> None:
        library.info("async handler ran")

    @app.on_event("thing.happened")
    def sync_handler(data: dict[str, Any], ctx: Context) -> None:  # runs in a worker thread
        library.info("sync handler ran")
        ctx.logger.info("through ctx.logger")

    async with run_apps(app) as env:
        event = await env.publish("thing.happened", {"secret": "not logged"}, saga_id="S-1")
        await env.settle(timeout=5)
    lines = [r for r in records(captured) if r["message"] in ("async handler ran", "sync handler ran",
                                                               "through ctx.logger")]
    assert len(lines) == 3
    for line in lines:
        assert line["correlation_id"] == event.correlation_id
        assert line["event_id"] == event.id
        assert line["saga_id"] == "S-1"
        assert line["event_type"] == "thing.happened"
    assert {line["handler"] for line in lines if line["logger"] == "some.library"} == {
        "logger_service.async_handler", "logger_service.sync_handler"
    }
    assert "not logged" not in captured.getvalue()
    assert current() is None  # reset after handling


async def test_failures_logged_by_the_dispatcher_carry_the_ids(captured: io.StringIO) -> None:
    app = App("failing_service")

    @app.on_event("thing.broke", retries=0)
    async def broken(data: dict[str, Any]) -> None:
        raise ValueError("boom")

    async with run_apps(app) as env:
        event = await env.publish("thing.broke")
        await env.settle(timeout=5)
    errors = [r for r in records(captured) if r["logger"] == "choreo.dispatcher" and r["level"] == "ERROR"]
    assert errors
    for line in errors:
        assert line["correlation_id"] == event.correlation_id
        assert "boom" in line["message"]
    assert any("exc_info" in line for line in errors)


def test_text_format_shows_dashes_outside_a_handler() -> None:
    stream = io.StringIO()
    handler = configure_logging("DEBUG", "text", stream)
    try:
        logging.getLogger("choreo.test").info("hello")
    finally:
        logging.getLogger().removeHandler(handler)
    assert stream.getvalue().rstrip().endswith("INFO choreo.test [- -] hello")


def test_json_formatter_without_the_filter_still_formats() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain %s", ("message",), None)
    assert json.loads(JsonFormatter().format(record))["message"] == "plain message"
    assert CorrelationFilter().filter(record) and record.correlation_id is None  # type: ignore[attr-defined]


def test_bad_level_or_format_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        configure_logging("INFO", "xml")
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD", "text")
