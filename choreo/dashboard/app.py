"""The dashboard as an ASGI app: ``create_app`` builds it, ``serve`` runs it.

Each view is one function that gathers a JSON-ready dict; it is mounted
twice, as a page (``/sagas``) and under ``/api/`` (``/api/sagas``), so the
page and the API cannot disagree. Pages are rendered on the server by Jinja
with autoescaping on, and served with a Content-Security-Policy that allows
no inline script: a hostile string in an event is shown, never run.

Replay and purge of dead letters are POSTs that need both ``allow_actions``
and the app's CSRF token (a hidden form field, or the ``X-CSRF-Token``
header for the API); anything else is refused with 403.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import attrs
import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from brokers import Broker, BrokerError
from choreo.dashboard.sagas import saga_page, saga_view
from choreo.dashboard.sequence import sequence_view
from choreo.dashboard.streams import FlowSampler, check_ids, dead_letter_page, flow_view
from choreo.errors import BrokerUnavailable, ChoreoError, ConfigurationError, DecodeError
from choreo.saga.query import BrokerSagaQuery, SagaQuery
from choreo.trace import collect

if TYPE_CHECKING:
    from choreo.app import App
    from choreo.saga.definition import SagaDefinition

__all__ = ("Dashboard", "create_app", "redact")

HERE = Path(__file__).parent
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


class Refused(ChoreoError):
    """An action the dashboard will not do (actions off, or no valid token)."""


@attrs.define
class Dashboard:
    """What the views read from: one broker, the saga store, the apps' routes.

    Attributes:
        broker: The broker (its inspection and state roles are read).
        sagas: Where sagas are read (``BrokerSagaQuery`` on ``broker`` by default).
        apps: Apps whose routing tables draw the flow and name saga steps.
        allow_actions: Whether replay and purge are allowed.
        owned: Whether the dashboard connected the broker (and closes it).
    """

    broker: Broker
    sagas: SagaQuery
    apps: Sequence[App] = ()
    allow_actions: bool = False
    owned: bool = False
    database: str | None = None
    token: str = attrs.Factory(lambda: secrets.token_urlsafe(32))
    sampler: FlowSampler = attrs.Factory(FlowSampler)
    connected: bool = False

    @property
    def definitions(self) -> Mapping[str, SagaDefinition]:
        from choreo.saga.coordinator import coordinator_of

        found: dict[str, SagaDefinition] = {}
        for app in self.apps:
            coordinator = coordinator_of(app)
            if coordinator is not None:
                found.update(coordinator.definitions)
        return found

    async def ready(self) -> Broker:
        """The broker, connected (again, after it went away).

        Raises:
            BrokerUnavailable: it cannot be reached.
        """
        if not self.connected:
            try:
                await self.broker.connect()
            except BrokerError as exc:
                raise BrokerUnavailable(f"{self.broker.url}: {exc}") from None
            self.connected = True
        return self.broker

    def check_action(self, token: str | None) -> None:
        if not self.allow_actions:
            raise Refused("actions are off: start the dashboard with --allow-actions to replay or purge")
        if not token or not hmac.compare_digest(token.encode(), self.token.encode()):
            raise Refused("missing or wrong CSRF token: reload the page and try again")


View = Callable[[Dashboard, Request], Awaitable[Any]]


def _when(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s" if value < 120 else f"{value / 60:.1f} min"


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    environment.filters.update(when=_when, seconds=_seconds, pretty=lambda v: json.dumps(v, indent=2, default=str))
    return environment


def _int(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    try:
        return default if value in (None, "") else int(str(value))
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number, not {value!r}") from None


# -- the views -------------------------------------------------------------------


async def sagas_list(dashboard: Dashboard, request: Request) -> Any:
    params = request.query_params
    if dashboard.database is None:  # sagas are in the broker's state
        await dashboard.ready()
    return await saga_page(dashboard.sagas, state=params.get("state") or None, name=params.get("name") or None,
                           after=params.get("after") or None, limit=_int(request, "limit", 50))


async def saga_detail(dashboard: Dashboard, request: Request) -> Any:
    saga_id = request.path_params["saga_id"]
    broker = await dashboard.ready()
    view = await saga_view(dashboard.sagas, broker, saga_id, dashboard.definitions)
    if view is None:
        raise LookupError(f"no saga {saga_id!r}")
    return view


async def transaction(dashboard: Dashboard, request: Request) -> Any:
    correlation_id = request.path_params["correlation_id"]
    broker = await dashboard.ready()
    trace = await collect(broker, correlation_id, apps=dashboard.apps)
    if not trace.events:
        raise LookupError(f"no events with correlation id {correlation_id!r}")
    return sequence_view(trace)


async def dead_letters(dashboard: Dashboard, request: Request) -> Any:
    broker = await dashboard.ready()
    page = await dead_letter_page(broker, offset=_int(request, "offset", 0), limit=_int(request, "limit", 50))
    return {**page, "allow_actions": dashboard.allow_actions}


async def flow(dashboard: Dashboard, request: Request) -> Any:
    broker = await dashboard.ready()
    return await flow_view(broker, dashboard.apps, dashboard.sampler)


async def health(dashboard: Dashboard, request: Request) -> Any:
    try:
        broker = await dashboard.ready()
        await broker.dead_letters(limit=1)
    except (BrokerError, ChoreoError) as exc:
        dashboard.connected = False
        return {"ok": False, "broker": dashboard.broker.url, "error": redact(str(exc))}
    return {"ok": True, "broker": dashboard.broker.url}


# -- actions ---------------------------------------------------------------------------


async def _act(dashboard: Dashboard, action: str, ids: list[str]) -> dict[str, Any]:
    broker = await dashboard.ready()
    if action == "purge":
        return {"purged": await broker.purge_dead_letters(ids)}
    replayed, missing = 0, []
    for dead_letter_id in ids:
        if await broker.replay(dead_letter_id):
            replayed += 1
        else:
            missing.append(dead_letter_id)
    return {"replayed": replayed, "missing": missing}


def _action_route(action: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        dashboard: Dashboard = request.app.state.dashboard
        api = request.url.path.startswith("/api/")
        try:
            if api:
                dashboard.check_action(request.headers.get("x-csrf-token"))
                try:
                    body = json.loads(await request.body() or b"{}")
                except ValueError:
                    raise ConfigurationError("the body must be JSON: {\"ids\": [...]}") from None
                ids = check_ids(body.get("ids") if isinstance(body, dict) else None)
            else:
                form = parse_qs((await request.body()).decode("utf-8", "replace"))
                dashboard.check_action(next(iter(form.get("csrf_token", [])), None))
                ids = check_ids(form.get("id"))
            done = await _act(dashboard, action, ids)
        except Exception as exc:
            return _failure(request, exc)
        if api:
            return JSONResponse(done, headers=_HEADERS)
        said = f"{done['purged']} purged" if action == "purge" else f"{done['replayed']} replayed"
        return RedirectResponse(f"/dead-letters?done={said.replace(' ', '+')}", status_code=303, headers=_HEADERS)

    return endpoint


# -- responses -----------------------------------------------------------------------


def _status(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, Refused):
        return 403, "refused"
    if isinstance(exc, LookupError):
        return 404, "not found"
    if isinstance(exc, ConfigurationError | DecodeError):
        return 400, "bad request"
    if isinstance(exc, BrokerError | BrokerUnavailable | ConnectionError | OSError):
        return 503, "broker unavailable"
    if isinstance(exc, ChoreoError):
        return 500, "error"
    raise exc


def _failure(request: Request, exc: Exception) -> Response:
    status, title = _status(exc)
    dashboard: Dashboard = request.app.state.dashboard
    if status == 503:
        dashboard.connected = False
    message = redact(str(exc.args[0]) if isinstance(exc, LookupError) and exc.args else str(exc))
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": title, "message": message}, status_code=status, headers=_HEADERS)
    return _page(request, "error.html", {"title": title, "message": message, "status": status}, status)


def _page(request: Request, template: str, data: Any, status: int = 200) -> Response:
    dashboard: Dashboard = request.app.state.dashboard
    environment: jinja2.Environment = request.app.state.templates
    html = environment.get_template(template).render(
        data=data, request=request, query=request.query_params, broker=dashboard.broker.url,
        database=dashboard.database, allow_actions=dashboard.allow_actions, token=dashboard.token,
        broker_down=status == 503,
    )
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


def _view_route(view: View, template: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            data = await view(request.app.state.dashboard, request)
        except Exception as exc:
            return _failure(request, exc)
        if request.url.path.startswith("/api/"):
            return Response(json.dumps(data, default=str), media_type="application/json", headers=_HEADERS)
        return _page(request, template, data)

    return endpoint


def _routes() -> list[BaseRoute]:
    views: list[tuple[str, View, str]] = [
        ("/sagas", sagas_list, "sagas.html"),
        ("/sagas/{saga_id:path}", saga_detail, "saga.html"),
        ("/transactions/{correlation_id:path}", transaction, "transaction.html"),
        ("/dead-letters", dead_letters, "dead_letters.html"),
        ("/flow", flow, "flow.html"),
    ]
    routes: list[BaseRoute] = [Route("/", lambda request: RedirectResponse("/sagas"))]
    for path, view, template in views:
        routes.append(Route(path, _view_route(view, template)))
        routes.append(Route("/api" + path, _view_route(view, template)))
    routes.append(Route("/api/health", _view_route(health, "error.html")))
    for action in ("replay", "purge"):
        routes.append(Route(f"/dead-letters/{action}", _action_route(action), methods=["POST"]))
        routes.append(Route(f"/api/dead-letters/{action}", _action_route(action), methods=["POST"]))
    routes.append(Mount("/static", StaticFiles(directory=HERE / "static"), name="static"))
    return routes


def create_app(
    broker: str | Broker,
    *,
    sagas: SagaQuery | None = None,
    apps: Sequence[App] = (),
    allow_actions: bool = False,
    allowed_hosts: Sequence[str] | None = None,
    database: str | None = None,
) -> Starlette:
    """The dashboard as an ASGI app (serve it with uvicorn, or ``serve``).

    Args:
        broker: A broker URL (connected when the app starts, closed when it
            stops) or a broker instance someone else connects and closes
            (the in-memory broker of the apps running in this process).
        sagas: Where sagas are read; default: the broker's state.
        apps: Apps whose routes draw ``/flow`` and name older sagas' steps.
        allow_actions: Allow replaying and purging dead letters.
        allowed_hosts: Host headers accepted (``None``: any); a dashboard on
            a loopback address should accept only loopback names, so that
            no web page can reach it by rebinding a DNS name.
        database: Where ``sagas`` reads, shown (redacted) in the header.

    Raises:
        ConfigurationError: an invalid broker URL.
    """
    from choreo.worker import connect_broker

    instance, owned = connect_broker(broker)
    dashboard = Dashboard(instance, sagas or BrokerSagaQuery(instance), tuple(apps), allow_actions, owned,
                          None if database is None else redact(database))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            close = getattr(dashboard.sagas, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
            if owned:
                with contextlib.suppress(Exception):
                    await instance.close()

    middleware = [] if allowed_hosts is None else [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]
    app = Starlette(routes=_routes(), middleware=middleware, lifespan=lifespan)
    app.state.dashboard = dashboard
    app.state.templates = _environment()
    return app

