"""Running a system and its dashboard for a test: apps and a real uvicorn
server in one event loop on a thread (the in-memory broker lives in one
process and one loop), driven from the test's thread; and one Chromium for
the whole session.

Chromium is Debian's (``/usr/bin/chromium``): Playwright's own browser
download cannot work on CI machines.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from choreo.app import App
from choreo.dashboard import bind, create_app, serve
from choreo.saga.query import SagaQuery
from choreo.testing import TestEnv, run_apps

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class LiveSystem:
    """``apps`` running on ``broker_url`` with a dashboard served on a free port.

    For ``memory://`` the dashboard reads the apps' own broker; for Redis it
    connects by URL, as ``choreo dashboard`` does.
    """

    def __init__(self, broker_url: str, apps: Sequence[App], *, allow_actions: bool = False,
                 sagas: SagaQuery | None = None, database: str | None = None) -> None:
        self.broker_url = broker_url
        self.apps = list(apps)
        self.options: dict[str, Any] = {"allow_actions": allow_actions, "sagas": sagas, "database": database}
        self.loop = asyncio.new_event_loop()
        self._started: Future[None] = Future()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="dashboard-system", daemon=True)
        self.env: TestEnv | None = None
        self.app: Any = None
        self.url = ""

    def __enter__(self) -> LiveSystem:
        self._thread.start()
        self._started.result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._run())
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
        finally:
            self.loop.close()

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        async with run_apps(*self.apps, broker=self.broker_url) as env:
            self.env = env
            target = env.broker if self.broker_url.startswith("memory:") else self.broker_url
            app = self.app = create_app(target, apps=self.apps, **self.options)
            with bind("127.0.0.1", 0) as sock:
                self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
                server = asyncio.ensure_future(serve(app, sock))
                await self._wait_listening()
                self._started.set_result(None)
                await self._stop.wait()
                server.cancel()
                await asyncio.gather(server, return_exceptions=True)

    async def _wait_listening(self) -> None:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", int(self.url.rsplit(":", 1)[1]))
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return

    def dashboard_token(self) -> str:
        """The CSRF token the pages carry (read from the app, as the page would show it)."""
        return str(self.app.state.dashboard.token)

    def call(self, work: Callable[[TestEnv], Awaitable[T]], timeout: float = 30) -> T:
        """Run ``work(env)`` in the system's loop and return its result."""
        assert self.env is not None
        return asyncio.run_coroutine_threadsafe(work(self.env), self.loop).result(timeout)

    def get(self, path: str) -> tuple[int, Any]:
        """GET ``path``: the status and the decoded JSON (or text)."""
        return request(self.url + path)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return request(self.url + path, body, headers or {})


def request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    method = "POST" if body is not None else "GET"
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers.get("content-type", "")
        exc.close()
    return status, json.loads(raw) if "json" in kind else raw.decode()


def browser_session() -> Iterator[Any]:
    """One headless Chromium for the whole session (see the module doc)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
