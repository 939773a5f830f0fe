"""The dashboard in a real browser (Debian's Chromium, driven by Playwright),
on every broker: each page is loaded, filtered and clicked, dead letters are
replayed from the page, hostile payloads stay text, and a broker that goes
away while a page is open is announced and the page recovers. Every page of
the memory run is screenshotted; with CHOREO_DOC_SCREENSHOTS=1 the shots
replace those of docs/dashboard/ (docs/dashboard.md shows them), otherwise
they go to a temporary folder, so a test run leaves the checkout as it was."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apps import dashboard_lab as lab
from tests.dashboard_seed import HOSTILE, run_lab, stuck_saga
from tests.dashboard_support import LiveSystem, browser_session
from tests.redis_server import RedisServer

SHOTS = (
    Path(__file__).resolve().parent.parent / "docs" / "dashboard"
    if os.environ.get("CHOREO_DOC_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "choreo-dashboard-shots"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for every browser test (they all live in this module).

    Not session-wide: Playwright's sync API holds an event loop on the main
    thread while it runs, which the suite's async tests need free.
    """
    yield from browser_session()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    yield tab
    context.close()


@pytest.fixture(autouse=True)
def audit_broken() -> None:
    lab.FIXED["audit"] = False


def shoot(tab: Any, broker_url: str, name: str) -> None:
    if broker_url.startswith("memory:"):
        SHOTS.mkdir(exist_ok=True)
        tab.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_every_page_loads_filters_and_links_in_a_browser(broker_url: str, page: Any) -> None:
    """Sagas filter by state and name with stuck ones standing out; a saga
    shows its timeline and trace and links to its transaction, drawn as a
    sequence diagram; dead letters and the flow are shown, script never runs."""
    with LiveSystem(broker_url, lab.build_apps()) as live:
        ran = live.call(run_lab)
        live.call(lambda env: stuck_saga(env.broker))
        page.goto(live.url + "/sagas")
        assert page.locator("table.sagas tbody tr").count() == 4
        assert page.locator("tr.stuck").count() == 2
        assert "past its timeout" in page.locator("tr.stuck", has_text="S-stuck").inner_text()
        shoot(page, broker_url, "sagas")

        page.select_option("#state", "failed")
        page.click("form.filters button")
        page.wait_for_url("**state=failed**")
        assert page.locator("table.sagas tbody tr").count() == 1
        page.select_option("#state", "")
        page.fill("#name", "checkout")
        page.click("form.filters button")
        page.wait_for_url("**name=checkout**")
        assert page.locator("table.sagas tbody tr").count() == 3  # two run, one stuck

        page.goto(live.url + "/sagas?state=failed")
        page.click(f"text={ran['failed'].saga_id}")
        page.wait_for_url(f"**/sagas/{ran['failed'].saga_id}")
        assert page.locator("svg.timeline rect.bar").count() == 3  # two steps, one compensation
        trace = page.locator("pre.trace").inner_text()
        assert f"[SAGA-{ran['failed'].saga_id}] Starting saga: trip" in trace
        assert "Compensation failed: book_hotel after 1 attempts: hotel provider is down" in trace
        shoot(page, broker_url, "saga")

        page.goto(live.url + f"/sagas/{ran['compensated'].saga_id}")
        assert page.locator("pre.payload").first.inner_text().count("<script>window.pwned=1</script>") == 1
        page.click("dl.facts a")  # the correlation id
        page.wait_for_url("**/transactions/**")
        assert page.locator("svg#sequence g.arrow").count() >= 6
        assert page.locator("svg#sequence .lane-name", has_text="booking_service").count() == 1

        page.goto(live.url + f"/transactions/{ran['paid'].correlation_id}")
        lanes = page.locator("svg#sequence .lane-name").all_text_contents()
        assert lanes == ["(publisher)", "inventory_service", "payment_service", "shipping_service", "order_service"]
        shoot(page, broker_url, "transaction")

        page.goto(live.url + "/dead-letters")
        row = page.locator("table.dead-letters tbody tr")
        assert row.count() == 1
        assert HOSTILE in row.locator("td.problem").inner_text()
        assert page.locator("#read-only").is_visible() and page.locator("#replay").count() == 0
        row.locator("summary").click()
        assert HOSTILE.replace('"', '\\"') in row.locator("pre.payload").inner_text()
        assert page.evaluate("window.pwned") is None
        shoot(page, broker_url, "dead-letters")

        page.goto(live.url + "/flow")
        assert page.locator("svg#flow g.node.handler").count() == sum(len(a.routes) for a in live.apps)
        assert page.locator("svg#flow g.edge.kind-failure").count() >= 3
        assert page.locator("#streams tbody tr").count() == sum(len(a.routes) for a in live.apps)
        shoot(page, broker_url, "flow")
        assert page.evaluate("window.pwned") is None


def test_dead_letters_are_replayed_from_the_page(broker_url: str, page: Any) -> None:
    """With --allow-actions a dead letter is selected and replayed; once its
    handler is fixed it goes through and the list is empty."""
    with LiveSystem(broker_url, lab.build_apps(), allow_actions=True) as live:
        live.call(run_lab)
        page.goto(live.url + "/dead-letters")
        page.check("table.dead-letters input[type=checkbox]")
        shoot(page, broker_url, "dead-letters-actions")
        lab.FIXED["audit"] = True
        page.click("#replay")
        page.wait_for_url("**/dead-letters?done=**")
        assert page.locator("#done").inner_text() == "1 replayed"
        live.call(lambda env: env.settle(timeout=10))
        page.reload()
        assert page.locator("table.dead-letters tbody tr").count() == 0
        assert [e.type for e in live.env.published("audit.recorded")] == ["audit.recorded"]  # type: ignore[union-attr]


def test_a_page_says_when_the_broker_goes_away_and_recovers(
    start_redis: Any, page: Any
) -> None:
    """Redis killed while pages are open: the open page shows a banner, a page
    loaded meanwhile says the broker is unavailable; both recover once Redis
    is back, the second by reloading itself."""
    server: RedisServer = start_redis()
    with LiveSystem(server.url, []) as live:
        page.goto(live.url + "/sagas")
        assert page.locator("#banner").is_hidden()
        server.kill()
        page.locator("#banner").wait_for(state="visible")
        assert "broker is unavailable" in page.locator("#banner").inner_text()
        other = page.context.new_page()
        response = other.goto(live.url + "/dead-letters")
        assert response.status == 503
        assert other.locator("h1").inner_text() == "Broker unavailable"
        server.start()
        page.locator("#banner").wait_for(state="hidden")
        other.locator("h1", has_text="Dead letters").wait_for()
