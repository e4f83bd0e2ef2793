"""The console (`/ui`) end to end: headless Chromium (Debian's `chromium`, driven by
Playwright, which never downloads a browser here) against a real worker on the test
broker. Each test writes screenshots of the pages it visits at 1280 and 390 px to
$AUDIENCES_TEST_ARTIFACTS (default build/artifacts/console/, git-ignored)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import Worker, wait_for
from harness import T0, Engine, track

from audiences.tools.demo.runner import demo_definitions

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium binary (apt-get install chromium; .ci/run and `make test` do)",
    ),
]
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

ADMIN, READER = "console-admin-token", "console-read-token"
BUYERS = {
    "key": "buyers",
    "name": "Buyers",
    "condition": {"performed": {"event": "Order Completed"}},
}
BROWSERS = {
    "key": "browsers",
    "name": "Browsers",
    "condition": {"performed": {"event": "Product Viewed"}},
}
DEMO = demo_definitions(5_000)  # `audiences demo`'s audiences and computed traits
ARTIFACTS = Path(os.environ.get("AUDIENCES_TEST_ARTIFACTS") or "build/artifacts/console")
WIDTHS = (1280, 390)


@pytest.fixture
def worker(engine: Engine, tmp_path: Path) -> Iterator[Worker]:
    engine.apply(*DEMO, BUYERS, BROWSERS)
    settings = engine.settings.replace(api_tokens=f"{ADMIN}:admin,{READER}:read")
    started = Worker(settings, tmp_path / "worker", engine.clock).start().wait_ready()
    engine.send(
        track("ann", "Order Completed", T0 - 60_000, revenue=30),
        track("bob", "Order Completed", T0 - 50_000, revenue=10),
        track("cid", "Product Viewed", T0 - 40_000),
        {  # ann works for a shop (the demo has an account audience of shops)
            "type": "group",
            "userId": "ann",
            "groupId": "shop1",
            "traits": {"name": "Shop 1"},
            "timestamp": "2025-12-31T23:58:30.000Z",
            "messageId": "ann-group-shop1",
        },
    )
    yield started
    started.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def open_page(browser: Any, token: str | None = ADMIN) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    if token is not None:
        context.add_init_script(f"sessionStorage.setItem('audiences-token', {token!r})")
    page = context.new_page()
    page.set_default_timeout(30_000)
    return page


def shoot(page: Any, name: str) -> None:
    """Screenshots of the page as it is, at both widths."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def settled(worker: Worker) -> None:
    """The three users' events are evaluated (buyers: ann and bob; browsers: cid)."""

    def sizes() -> bool:
        answer = worker("GET", "/v1/audiences", headers=auth()).json()["audiences"]
        sizes = {a["key"]: a["size"] for a in answer}
        return (sizes["buyers"], sizes["browsers"]) == (2, 1)

    wait_for(sizes, 60, "the events to be evaluated")


def row(page: Any, key: str) -> Any:
    return page.locator(f"tr[data-key='{key}']")


def test_audiences_page_asks_for_a_token_and_shows_sizes_then_an_audience_chart(
    worker: Worker, engine: Engine, browser: Any
) -> None:
    settled(worker)
    page = open_page(browser, token=None)
    page.goto(worker.url + "/ui")
    dialog = page.get_by_role("dialog", name="API token")
    expect(dialog).to_be_visible()  # the API answered 401: the console asks once
    dialog.get_by_label("Token", exact=True).fill(ADMIN)
    page.get_by_role("button", name="Use token").click()
    expect(row(page, "buyers").locator("[data-col=size]")).to_have_text("2")
    expect(row(page, "browsers").locator("[data-col=size]")).to_have_text("1")
    expect(row(page, "buyers").locator("[data-col=entered]")).to_have_text("2")  # history
    for doc in DEMO:  # the demo's audiences with their sizes, and its computed traits
        size = row(page, doc["key"]).locator("[data-col=size]")
        expect(size).to_have_text(re.compile(r"^\d+$") if "condition" in doc else "—")
    size_header = page.get_by_role("button", name="Size", exact=True)
    size_header.click()  # sort by size, then again: largest first
    expect(page.locator("th[aria-sort=ascending]")).to_contain_text("Size")
    size_header.click()
    expect(page.locator("th[aria-sort=descending]")).to_contain_text("Size")
    expect(page.locator("tbody tr").first.locator("[data-col=size]")).to_have_text("2")
    expect(page).to_have_url(re.compile(r"sort=size&desc=1$"))
    page.get_by_label("Filter").fill("brow")
    expect(row(page, "buyers")).to_have_count(0)
    expect(row(page, "browsers")).to_have_count(1)
    page.get_by_label("Filter").fill("")
    expect(row(page, "buyers").get_by_role("img")).to_have_count(1)  # its sparkline
    shoot(page, "audiences")

    page.get_by_role("link", name="Buyers", exact=True).click()
    expect(page).to_have_url(re.compile(r"/ui/audiences/buyers$"))
    expect(page.get_by_role("heading", name="Buyers", level=1)).to_be_visible()
    expect(page.get_by_test_id("size")).to_have_text("2")
    chart = page.get_by_test_id("history-chart")
    expect(chart).to_be_visible()
    expect(chart.locator("[data-series=size]")).to_have_count(1)
    expect(page.get_by_role("table", name="Members").locator("tbody tr")).to_have_count(2)
    expect(page.get_by_text("performed", exact=True)).to_be_visible()  # the condition tree
    shoot(page, "audience")

    # every page renders from its address alone (a reload, a shared link)
    for path, heading in (
        ("/ui", "Audiences"),
        ("/ui/audiences/buyers", "Buyers"),
        ("/ui/users/ann", "User ann"),
        ("/ui/live", "Live transitions"),
        ("/ui/new?key=buyers", "Edit buyers"),
    ):
        page.goto(worker.url + path)
        page.reload()
        expect(page.get_by_role("heading", name=heading, level=1)).to_be_visible()


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_editor_previews_then_saves_a_new_version(
    worker: Worker, engine: Engine, browser: Any
) -> None:
    settled(worker)
    page = open_page(browser)
    page.goto(worker.url + "/ui/new?key=buyers")
    editor = page.get_by_label("Definition (JSON)")
    expect(page.get_by_test_id("preview-size")).to_have_text("2")
    # an invalid edit: the API's 422 shows at its JSON path as one types
    editor.fill('{"key": "buyers", "name": "Buyers", "condition": {"performd": {}}}')
    expect(page.locator("#problems [data-path]")).to_contain_text("$.condition")
    # a valid edit that moves people: ann and bob would exit, cid would enter
    editor.fill(
        '{"key": "buyers", "name": "Buyers",'
        ' "condition": {"performed": {"event": "Product Viewed"}}}'
    )
    expect(page.get_by_test_id("preview-entering")).to_have_text("1")
    expect(page.get_by_test_id("preview-exiting")).to_have_text("2")
    expect(page.get_by_test_id("would-enter")).to_contain_text("cid")
    expect(page.get_by_test_id("would-exit")).to_contain_text("ann")
    shoot(page, "editor")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#save-note")).to_contain_text("Saved: version 2")
    page.get_by_role("link", name="Open the audience").click()
    expect(page.get_by_test_id("version")).to_have_text("2")

    # a read-only token cannot save: the Save button says why
    reader = open_page(browser, token=READER)
    reader.goto(worker.url + "/ui/new?key=buyers")
    expect(reader.get_by_test_id("preview-size")).to_be_visible()  # reading works
    reader.get_by_role("button", name="Save").click()
    note = reader.locator("#save-note")
    expect(note).to_contain_text("Cannot save with this token")
    expect(note).to_contain_text("write")
    expect(reader.get_by_role("button", name="Save")).to_have_attribute("aria-disabled", "true")
    shoot(reader, "editor-read-only")
    # nor delete a user (that needs admin)
    reader.goto(worker.url + "/ui/users/ann")
    reader.get_by_role("button", name="Delete this user…").click()
    reader.get_by_role("button", name="Delete", exact=True).click()
    expect(reader.get_by_text("Cannot delete with this token")).to_contain_text("admin")
    assert worker("GET", "/v1/audiences/buyers", headers=auth()).json()["version"] == 2


def test_a_user_page_explains_why_and_the_live_feed_shows_a_new_transition(
    worker: Worker, engine: Engine, browser: Any
) -> None:
    settled(worker)
    page = open_page(browser)
    page.goto(worker.url + "/ui")
    page.get_by_label("User id or anonymous id").fill("ann")
    page.get_by_role("button", name="Find").click()
    expect(page).to_have_url(re.compile(r"/ui/users/ann$"))
    members_of = page.get_by_role("table", name="Audiences")
    expect(members_of.get_by_role("link", name="Buyers", exact=True)).to_be_visible()
    members_of.get_by_role("button", name="Why in Buyers?").click()
    tree = page.get_by_test_id("explain-tree")
    expect(page.get_by_role("heading", name="Why in buyers")).to_be_visible()
    expect(tree.locator(".pill").first).to_have_text("true")
    expect(tree).to_contain_text("performed")
    expect(tree).to_contain_text("Order Completed")
    # an account audience's per-user predicate is no audience of the user's
    expect(members_of).not_to_contain_text("active_shops.0")
    accounts = page.get_by_role("table", name="Accounts")
    expect(accounts).to_contain_text("shop1")
    expect(accounts.get_by_role("link", name="group:shop1")).to_be_visible()
    shoot(page, "user")
    # deletion, after a confirmation
    page.goto(worker.url + "/ui/users/cid")
    page.get_by_role("button", name="Delete this user…").click()
    confirm = page.get_by_role("dialog", name="Delete cid?")
    expect(confirm).to_be_visible()
    confirm.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    assert worker("GET", "/v1/users/cid", headers=auth()).status == 200  # cancelled: kept
    page.get_by_role("button", name="Delete this user…").click()
    confirm.get_by_role("button", name="Delete", exact=True).click()
    expect(page.get_by_text("Deletion accepted")).to_be_visible()
    wait_for(lambda: worker("GET", "/v1/users/cid", headers=auth()).status == 404, 60, "cid gone")

    page.get_by_role("link", name="Live").click()
    page.get_by_label("Show").select_option("browsers")
    expect(page).to_have_url(re.compile(r"/ui/live\?audience=browsers$"))
    expect(page.locator("[data-state]")).to_have_attribute("data-state", "live")
    engine.send(
        track("dan", "Order Completed", T0 + 1000),  # buyers: filtered out
        track("eve", "Product Viewed", T0 + 2000),
    )
    feed = page.get_by_test_id("live-feed")
    expect(feed.locator("li[data-user=eve]")).to_contain_text("entered browsers")
    expect(feed.locator("li[data-user=dan]")).to_have_count(0)
    shoot(page, "live")
