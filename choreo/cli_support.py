"""What the ``choreo`` commands share: the broker option, argument types and
turning library errors into one line and an exit code."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import typer

from brokers import BrokerError
from choreo.errors import ChoreoError, ConfigurationError, DecodeError

BrokerOption = Annotated[
    str | None,
    typer.Option("--broker", "-b", envvar="CHOREO_BROKER_URL", help="Broker URL (memory://, redis://, rediss://)."),
]
DatabaseOption = Annotated[
    str | None,
    typer.Option("--database", envvar="CHOREO_DATABASE_URL", help="PostgreSQL URL (postgresql://...)."),
]
TargetsArgument = Annotated[list[str], typer.Argument(help="Apps, as module:app (or module, if it holds one App).")]


class LogFormat(enum.StrEnum):
    text = "text"
    json = "json"


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class GraphFormat(enum.StrEnum):
    mermaid = "mermaid"
    dot = "dot"


class GroupStart(enum.StrEnum):
    auto = "auto"
    beginning = "beginning"
    end = "end"


class TraceFormat(enum.StrEnum):
    tree = "tree"
    mermaid = "mermaid"


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code, never a traceback."""
    try:
        yield
    except (ConfigurationError, DecodeError) as exc:
        raise fail(str(exc), 2) from None
    except (ChoreoError, BrokerError) as exc:
        raise fail(str(exc), 1) from None
    except TimeoutError as exc:
        raise fail(str(exc) or "timed out", 1) from None
    except OSError as exc:
        raise fail(f"{exc.strerror or exc}", 1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def load_targets(targets: Sequence[str]) -> list[Any]:
    from choreo.loader import load_apps

    return load_apps(list(targets))


def render_table(rows: list[dict[str, str]], columns: Sequence[str]) -> str:
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)
