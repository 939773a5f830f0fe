"""The CLI's error paths: one clear line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from tests.redis_server import RedisServer
from tests.worker_process import choreo

MEMORY = ("--broker", "memory://")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("publish", "order.created", "{}", "--delay", "-5", *MEMORY), "delay must be a number of seconds >= 0"),
        (("publish", "order.created", "{}", "--delay", "nan", *MEMORY), "delay must be a number of seconds >= 0"),
        (("publish", "_dead", "{}", *MEMORY), "invalid event type '_dead'"),
        (("publish", "order.created", '{"a": 1, "a": 2}', *MEMORY), "duplicate key 'a'"),
        (("publish", "order.created", '{"n": 1e400}', *MEMORY), "out of range"),
        (("publish", "order.created", "{}", "--id", "", *MEMORY), "invalid id ''"),
        (("publish", "order.created", "{}", "--id", "x" * 100_000, *MEMORY), "invalid id 'xxx"),
        (("publish", "order.created", "{}", "--broker", "memory://?bogus_option=1"), "unknown broker option"),
        (("worker", "tests.apps.shop:app", "--broker", "memory://?visibility_timeout=soon"), "'soon' is not"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(args: tuple[str, ...], says: str) -> None:
    result = choreo(*args)
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and errors[0].startswith("error: ") and says in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.redis
def test_an_unknown_redis_url_option_is_named_not_passed_to_the_client(redis_server: RedisServer) -> None:
    """`?bogus_option=1` used to surface redis-py's TypeError at connect."""
    result = choreo("publish", "order.created", "{}", "--broker", f"{redis_server.url}?bogus_option=1")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: unknown broker option 'bogus_option'") and "ssl_ca_certs" in line
    assert "TypeError" not in result.stderr


@pytest.mark.redis
def test_redis_connection_options_in_the_url_still_work(redis_server: RedisServer) -> None:
    result = choreo(
        "publish", "order.created", "{}", "--broker",
        f"{redis_server.url}?socket_timeout=5&client_name=publisher&visibility_timeout=30",
    )
    assert result.returncode == 0, result.stderr
