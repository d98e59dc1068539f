"""A new workflow's one carried step is sent before its submit's commit has returned.

On PostgreSQL the API sends such a step while its commit is under way
(``app.api.routes.workflows._write_and_send``): its worker reads nothing before the model.
The submit's first statement takes a lock named after the workflow
(``app.rows.SUBMIT_LOCK``); a worker whose first write does not find the workflow waits on
it and looks again (``app.claims.wait_submitted``). The result is stored once the submit
commits; when the submit rolls back, the step is dropped, nothing is written, and its
sent-marker goes, so that a submit that commits after all has its step sent again by the
reconciler. A long step's late claim waits the same way. Real PostgreSQL and Redis, the
tiny model on llama.cpp, the API in process (ASGI).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Connection, text

from app import claims, dispatch, engine, prepared, rows
from app.store import db
from app.scheduler import live
from app.core.config import Settings
from app.workflows.spec import validate_workflow
from app.store.tables import StepStatus, WorkflowStatus
from models.catalog import load_catalog
from tests.app.test_engine import gen, steps_of, workflow
from tests.utils.asgi import api
from tests.utils.recording import RecordingDispatcher
from workers.runtime import LlamaCppRuntime
from workers.steps import run_step

ONE: dict[str, Any] = {"name": "early", "steps": [gen("a")]}
_KEY_OF = text("SELECT api_key_id FROM workflow_run WHERE id = :id")


@pytest.fixture
def pg(isolated: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    if not isolated.sqlalchemy_url.startswith("postgresql"):
        pytest.skip("a step is sent before its commit where its work is carried: PostgreSQL")
    monkeypatch.setattr(claims, "SUBMIT_LOOKS_S", (0.02, 0.05))  # a failed submit, found soon
    return isolated


def _waiting_on_submit() -> int:
    """Sessions waiting on a submit's lock, now."""
    query = text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        f" AND classid = {rows.SUBMIT_LOCK_CLASS}"
    )
    with db.connection_scope() as conn:
        return int(conn.execute(query).scalar_one())


def _until(condition: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextmanager
def _open_submit(settings: Settings) -> Iterator[tuple[engine.Created, Connection]]:
    """A one-step workflow's submit, its statements run in a transaction left open."""
    validated = validate_workflow(ONE, load_catalog(settings.catalog_path), settings)
    run, statements = engine.plan_workflow(validated)
    assert run.send_early and statements[0][0] is rows.SUBMIT_LOCK
    with db.connection_scope(write=True, explicit=True) as conn:
        prepared.script(conn, statements, begin=True)
        yield run, conn


class _Worker(threading.Thread):
    """``run_step`` of a carried dispatch, in a thread; ``outcome`` once it ended."""

    def __init__(self, d: engine.Dispatch, runtime: LlamaCppRuntime) -> None:
        super().__init__(daemon=True)
        self.d, self.runtime, self.outcome = d, runtime, ""

    def run(self) -> None:
        d = self.d
        self.outcome = run_step(
            d.step_run_id, d.attempt, self.runtime, RecordingDispatcher(), carried=d.work
        )


def _marker(step_run_id: str) -> dict[str, int]:
    return dispatch.sent_attempts(live.get_redis(), [step_run_id])


@pytest.mark.usefixtures("pg")
def test_the_api_sends_a_carried_step_before_its_commit(runtime: LlamaCppRuntime) -> None:
    """The submit's INSERT is held back (a lock on its API key's row): its step is sent meanwhile,
    its worker runs the model and its result waits for the commit; once the table is
    released the client hears of the workflow, and the result is stored."""
    dispatcher = RecordingDispatcher()

    async def scenario() -> tuple[int, str, engine.Dispatch, str]:
        async with api(dispatcher) as client:
            warm = await client.post("/v1/workflows", json=ONE)  # the vocabulary, the pools
            assert warm.status_code == 202, warm.text
            dispatcher.sent.clear()
            with db.get_engine(write=True).connect() as holder:
                # The submit's INSERT checks its API key's row (a foreign key): held here,
                # it waits, its first statement (the submit's lock) already run. Nothing
                # the worker writes reads that row.
                key_id = holder.execute(_KEY_OF, {"id": warm.json()["id"]}).scalar_one()
                holder.execute(
                    text("SELECT id FROM api_key WHERE id = :k FOR UPDATE"), {"k": key_id}
                )
                submit = asyncio.create_task(client.post("/v1/workflows", json=ONE))
                await asyncio.to_thread(_until, lambda: dispatcher.sent, "the step's send")
                assert not submit.done()  # sent while the submit's write waits
                (d,) = dispatcher.sent
                assert d.work is not None
                worker = _Worker(d, runtime)
                worker.start()
                await asyncio.to_thread(_until, _waiting_on_submit, "the result's wait")
                assert worker.is_alive() and not submit.done()
                holder.commit()  # the key's row is free: the submit commits
            resp = await asyncio.wait_for(submit, 30)
            await asyncio.to_thread(worker.join, 30)
            return resp.status_code, resp.json()["id"], d, worker.outcome

    status, wid, d, outcome = asyncio.run(scenario())
    assert status == 202 and outcome == "succeeded"
    a = steps_of(wid)["a"]
    assert a.id == d.step_run_id
    assert (a.status, a.attempts) == (StepStatus.succeeded, 1)
    assert a.output is not None and a.output["completion_tokens"] > 0
    assert workflow(wid).status is WorkflowStatus.succeeded


@pytest.mark.usefixtures("pg")
def test_a_result_stored_once_its_submit_commits(
    settings: Settings, runtime: LlamaCppRuntime
) -> None:
    with _open_submit(settings) as (run, conn):
        (d,) = run.dispatches
        worker = _Worker(d, runtime)
        worker.start()
        _until(_waiting_on_submit, "the result's wait")
        assert worker.is_alive()
        prepared.script(conn, [], commit=True)
    worker.join(30)
    assert worker.outcome == "succeeded"
    assert workflow(run.id).status is WorkflowStatus.succeeded
    assert steps_of(run.id)["a"].attempts == 1


@pytest.mark.usefixtures("pg")
def test_a_step_whose_submit_rolled_back_is_dropped_and_its_marker_goes(
    settings: Settings, runtime: LlamaCppRuntime
) -> None:
    """Rolled back while its worker waits: dropped, nothing written, the marker gone. The
    same submit committed afterwards (a submit that reached the database too late for the
    worker's looks) has its step sent again by the reconciler: nothing is lost."""
    validated = validate_workflow(ONE, load_catalog(settings.catalog_path), settings)
    run, statements = engine.plan_workflow(validated)
    (d,) = run.dispatches
    live.get_redis().set(dispatch.SENT_PREFIX + d.step_run_id, d.attempt)  # as its send left
    with db.connection_scope(write=True, explicit=True) as conn:
        prepared.script(conn, statements, begin=True)
        worker = _Worker(d, runtime)
        worker.start()
        _until(_waiting_on_submit, "the result's wait")
        conn.exec_driver_sql("ROLLBACK")
    worker.join(30)
    assert worker.outcome == "stale"
    assert not claims.submitted(run.id)
    assert _marker(d.step_run_id) == {}
    # Committed late: the reconciler finds the step unconfirmed and sends it again.
    with db.connection_scope(write=True, explicit=True) as conn:
        prepared.script(conn, statements)
    again = RecordingDispatcher()
    assert dispatch.reconcile(again, older_than_s=0.0) >= 1
    assert d.step_run_id in {s.step_run_id for s in again.sent}
    assert steps_of(run.id)["a"].status is StepStatus.queued


@pytest.mark.usefixtures("pg")
def test_a_long_step_s_late_claim_waits_for_its_submit(
    settings: Settings, runtime: LlamaCppRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The late claim (``CORRAL_CLAIM_AFTER_S``, 20 ms here) of a step whose submit has not
    committed: it waits for the commit and then marks the step running."""
    marks: list[bool] = []
    real = claims.mark_running

    def spy(work: claims.StepWork) -> bool:
        marks.append(real(work))
        return marks[-1]

    monkeypatch.setattr(claims, "mark_running", spy)
    long = {**ONE, "steps": [gen("a", input={"prompt": "count", "max_tokens": 400})]}
    validated = validate_workflow(long, load_catalog(settings.catalog_path), settings)
    run, statements = engine.plan_workflow(validated)
    (d,) = run.dispatches
    with db.connection_scope(write=True, explicit=True) as conn:
        prepared.script(conn, statements, begin=True)
        worker = _Worker(d, runtime)
        worker.start()
        _until(_waiting_on_submit, "the late claim's wait")
        assert marks == [False]  # not found: then the wait, not "no longer this attempt's"
        prepared.script(conn, [], commit=True)
    worker.join(60)
    assert worker.outcome == "succeeded" and marks == [False, True]
    assert workflow(run.id).status is WorkflowStatus.succeeded
