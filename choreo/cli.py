"""The ``choreo`` command: a thin adapter from arguments to library calls."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer

from choreo.errors import ChoreoError

app = typer.Typer(
    name="choreo",
    help="Sagas and choreography over events.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BrokerOption = Annotated[
    str | None,
    typer.Option("--broker", "-b", envvar="CHOREO_BROKER_URL", help="Broker URL (memory://, redis://, rediss://)."),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def worker(
    targets: Annotated[list[str], typer.Argument(help="Apps to run, as module:app.")],
    broker: BrokerOption = None,
    concurrency: Annotated[int, typer.Option(help="Handlers running at once.")] = 64,
    grace: Annotated[float, typer.Option(help="Seconds to drain in-flight handlers on shutdown.")] = 10.0,
) -> None:
    """Run apps until SIGINT/SIGTERM, then drain in-flight handlers and exit 0."""
    from choreo.loader import load_apps
    from choreo.worker import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        apps = load_apps(targets)
        asyncio.run(serve(apps, broker=broker, concurrency=concurrency, grace=grace))
    except ChoreoError as exc:
        raise fail(str(exc)) from None


@app.command()
def demo(broker: BrokerOption = None) -> None:
    """Run the order choreography demo (in memory unless --broker is given)."""
    import sys

    from choreo.demo import run_demo

    # Retries and failures show inline with the flow.
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="    ! %(message)s")
    try:
        asyncio.run(run_demo(broker or "memory://", out=typer.echo))
    except ChoreoError as exc:
        raise fail(str(exc)) from None


def main() -> None:
    app()
