"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a real
`corral api` and real worker processes.

Screenshots of every page go to ``CORRAL_UI_SCREENSHOTS`` when it is set (that is how
``docs/screenshots/`` is made), else to the test's temporary directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.config import use_settings
from app.core.redis import get_redis
from app.governance.evaluate import evaluate
from app.scheduler import pools
from tests.utils.databases import with_database
from tests.utils.platform import Platform, module_settings, start_platform
from tests.utils.workflows import gen

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
REDIS_DB = "5"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
if not CHROMIUM.exists():
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def plat(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("ui")
    settings = module_settings(root, with_database(redis_base_url, REDIS_DB), [])
    with use_settings(settings):
        (root / "logs").mkdir()
        # Two declared GPUs: the pools are placed on them by the scheduler.
        gpus = {"CORRAL_GPUS": "0:2GiB,1:2GiB", "CORRAL_GPU_OVERHEAD_BYTES": str(600 * 2**20)}
        p = start_platform(
            settings, root / "logs", {"tiny-chat": 1, "tiny-embed": 1}, extra_env=gpus
        )
        try:
            yield p
        finally:
            p.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, plat: Platform) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("CORRAL_UI_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sign_in(page: Any, plat: Platform, where: str = "/ui/workflows") -> None:
    page.goto(plat.url + where)
    assert "/ui/login" in page.url
    page.fill("input[name=key]", plat.key)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(where) + "$"))


def test_without_a_session_every_page_sends_you_to_sign_in(page: Any, plat: Platform) -> None:
    for path in ("/ui", "/ui/workflows", "/ui/gpus", "/ui/alerts", "/ui/workflows/abc"):
        page.goto(plat.url + path)
        assert "/ui/login" in page.url, path
    page.fill("input[name=key]", "crl_wrong_key")
    page.click("button[type=submit]")
    assert page.locator("[role=alert]").inner_text() == "Unknown key."
    assert page.context.cookies() == []


def test_sign_in_watch_a_run_succeed_and_re_run_it(page: Any, plat: Platform, shots: Path) -> None:
    sign_in(page, plat)
    cookie = next(c for c in page.context.cookies() if c["name"] == "corral_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"

    # Submitted through the API while the list is open: the list shows it by itself.
    spec = {
        "name": "ui-demo",
        "steps": [
            gen("draft", "Write", 24),
            {**gen("critique", "Critique", 16), "depends_on": ["draft"]},
            {
                "id": "index",
                "kind": "embed",
                "model": "tiny-embed",
                "depends_on": ["draft"],
                "input": {"texts": ["{{ steps.draft.output.text }}"]},
            },
            {**gen("revise", "Revise", 16), "depends_on": ["critique", "index"]},
        ],
    }
    wid = plat.submit(spec).json()["id"]
    page.locator(f"a[href='/ui/workflows/{wid}']").wait_for()

    page.click(f"a[href='/ui/workflows/{wid}']")
    page.wait_for_url(f"**/ui/workflows/{wid}")
    page.wait_for_function(
        "document.querySelector('#run-status').textContent === 'succeeded'", timeout=60_000
    )
    assert page.locator("svg.graph g.node").count() == 4
    assert page.locator("svg.graph g.node.succeeded").count() == 4
    assert page.locator("svg.graph path.edge").count() == 4
    assert [page.locator("tr.step td").nth(i * 9).inner_text() for i in range(4)] == [
        "draft",
        "critique",
        "index",
        "revise",
    ]
    assert page.locator("tr.step .badge.succeeded").count() == 4
    assert page.locator("tr.step td.pool").first.inner_text().startswith("tiny-chat@")
    assert "vector(s) of" in page.locator("tr.detail").nth(2).inner_text()
    page.screenshot(path=str(shots / "run.png"), full_page=True)

    page.click("text=Re-run")
    page.wait_for_url(re.compile(r"/ui/workflows/[0-9a-f]{32}$"))
    assert wid not in page.url
    rerun = page.url.rsplit("/", 1)[1]
    assert plat.wait(rerun)["name"] == "ui-demo"
    page.goto(plat.url + "/ui/workflows?status=succeeded")
    assert page.locator(f"a[href='/ui/workflows/{rerun}']").count() == 1
    page.screenshot(path=str(shots / "workflows.png"), full_page=True)

    # A POST without the page's CSRF token is refused, with the session cookie.
    resp = page.request.post(f"{plat.url}/ui/workflows/{wid}/rerun", form={"csrf": "forged"})
    assert resp.status == 403


def test_cancel_a_running_workflow(page: Any, plat: Platform) -> None:
    sign_in(page, plat)
    long = {
        "name": "ui-long",
        "steps": [
            {
                "id": "long",
                "kind": "generate",
                "model": "tiny-chat",
                "input": {"prompt": "Go", "max_tokens": 8000, "ignore_eos": True},
            }
        ],
    }
    wid = plat.submit(long).json()["id"]
    page.goto(f"{plat.url}/ui/workflows/{wid}")
    page.wait_for_function(
        "document.querySelector('tr.step .badge').textContent === 'running'", timeout=30_000
    )
    page.click("button.danger")
    page.wait_for_function(
        "document.querySelector('#run-status').textContent === 'cancelled'", timeout=30_000
    )
    assert plat.wait(wid)["steps"][0]["status"] == "cancelled"
    assert page.locator("button.danger").count() == 0  # a finished run has no Cancel


def test_platform_pages_show_pools_models_alerts_and_conversations(
    page: Any, plat: Platform, shots: Path
) -> None:
    conv = plat.client.post(
        "/v1/conversations", json={"user_id": "ada", "model": "tiny-chat", "title": "UI demo"}
    ).json()
    resp = plat.client.post(
        f"/v1/conversations/{conv['id']}/messages", json={"content": "I prefer short answers."}
    )
    assert resp.status_code == 201, resp.text
    resp = plat.client.put("/v1/memory/ada/blocks/user", json={"value": "Prefers short answers."})
    assert resp.status_code == 200, resp.text
    sign_in(page, plat, "/ui/gpus")
    assert page.locator("tr.pool[data-model='tiny-chat']").count() >= 1
    assert page.locator("tr.pool[data-model='tiny-embed']").count() >= 1
    # Both pools reserved room on the declared GPUs: bars, and their reservations listed.
    assert page.locator(".gpu").count() == 2
    reserved = page.locator(".gpu .bar .reserved").evaluate_all(
        "bars => bars.map(b => parseFloat(b.style.width))"
    )
    assert sum(reserved) > 0
    assert "tiny-chat" in page.locator(".gpu ul.res").all_inner_texts().__str__()
    # These pools were started by hand: no agent has acted; an agent's action is listed.
    assert "No agent has acted yet" in page.locator("#agent-events").inner_text()
    assert page.locator("tr.pool[data-model='tiny-chat'] .badge").first.inner_text() in (
        "idle",
        "ready",
    )
    pools.record(get_redis(), "unload", "gpu-host", "tiny-embed", node="n1", reason="idle 300 s")
    page.reload()
    event = page.locator("#agent-events tbody tr").first.inner_text()
    assert "unload" in event and "tiny-embed" in event and "idle 300 s" in event
    page.screenshot(path=str(shots / "gpus.png"), full_page=True)

    page.goto(plat.url + "/ui/models")
    row = page.locator("tr.model[data-model='tiny-chat']")
    assert "present" in row.inner_text()
    page.screenshot(path=str(shots / "models.png"), full_page=True)

    rule = {
        "id": "chat-pool-up",
        "name": "tiny-chat has a pool",
        "category": "resource",
        "severity": "info",
        "conditions": [
            {"metric": "pools_live", "op": ">=", "threshold": 1, "match": {"model": "tiny-chat"}}
        ],
    }
    assert plat.client.post("/v1/rules", json=rule).status_code == 201
    assert evaluate() is not None  # what beat runs: the rule fires
    page.goto(plat.url + "/ui/alerts")
    assert page.locator("#rules").inner_text().count("step-error-rate-high") == 1
    firing = page.locator("#alerts tr.alert", has_text="chat-pool-up")
    assert "firing" in firing.inner_text() and "model=tiny-chat" in firing.inner_text()
    page.screenshot(path=str(shots / "alerts.png"), full_page=True)

    page.goto(plat.url + "/ui/conversations")
    page.click(f"a[href='/ui/conversations/{conv['id']}']")
    page.wait_for_url(f"**/ui/conversations/{conv['id']}")
    assert "I prefer short answers." in page.locator(".messages").inner_text()
    assert "Prefers short answers." in page.locator(".blocks").inner_text()
    assert "Nothing consolidated yet." in page.locator("ul.archive").inner_text()
    # What consolidation would store, planted for this key's user: shown with its source.
    from app.memory.archive import NewEntry
    from app.memory.keys import tenant_of
    from app.memory.service import get_memory
    from app.store import db, keys

    with db.session_scope() as session:
        tenant = tenant_of(keys.verify_key(session, plat.key).id)
    fact = NewEntry("The user prefers short answers.", "preference", conv["id"], 1, 1, "r1")
    get_memory().archive.add(tenant, "ada", [fact])
    page.reload()
    entry = page.locator("ul.archive li.entry.preference")
    assert "The user prefers short answers." in entry.inner_text()
    assert "messages 1–1" in entry.inner_text()
    assert "consolidated to message 0" in page.locator("main").inner_text()
    page.screenshot(path=str(shots / "conversation.png"), full_page=True)

    page.click("text=Sign out")
    page.wait_for_url("**/ui/login")
    page.goto(plat.url + "/ui/gpus")
    assert "/ui/login" in page.url
