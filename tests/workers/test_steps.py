"""A step attempt end to end in process: ``run_step`` with a real llama.cpp runtime on the
tiny model, a real database (SQLite, and PostgreSQL when configured) and Redis, the
dispatcher recording its sends. What the database shows of the step while it runs is
read by another thread, as a client would.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

import pytest

from app import engine
from app.core.config import Settings, use_settings
from app.workflows.spec import INPUT_MODELS
from app.store.tables import StepStatus
from tests.app.test_engine import create, steps_of
from tests.utils.recording import RecordingDispatcher
from workers.runtime import LlamaCppRuntime, RunControl
from workers.steps import run_step


def long_step(tokens: int) -> dict[str, Any]:
    return {
        "id": "a",
        "kind": "generate",
        "model": "tiny-chat",
        "input": {"prompt": "Go", "max_tokens": tokens, "ignore_eos": True, "temperature": 0},
    }


class Watcher:
    """Reads the step's row every few milliseconds while the worker runs it."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        self.seen: list[tuple[StepStatus, int, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _read(self) -> None:
        a = steps_of(self.workflow_id)["a"]
        self.seen.append((a.status, a.attempts, a.started_at))

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._read()
            time.sleep(0.003)

    def __enter__(self) -> Watcher:
        self._read()  # the row before the worker starts, however late the thread's first read
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()  # and once after the worker returned

    def statuses(self) -> list[StepStatus]:
        out: list[StepStatus] = []
        for status, _, _ in self.seen:
            if not out or out[-1] is not status:
                out.append(status)
        return out


def _tokens_for(runtime: LlamaCppRuntime, seconds: float) -> int:
    """Tokens the tiny model takes about ``seconds`` to generate on this machine."""
    started = time.perf_counter()
    params = INPUT_MODELS["generate"].model_validate(long_step(200)["input"]).model_dump()
    runtime.generate(params, RunControl())
    per_token = (time.perf_counter() - started) / 200
    return min(runtime.n_ctx - 16, max(200, int(seconds / per_token)))


def run_watched(
    settings: Settings, runtime: LlamaCppRuntime, tokens: int, *, claim_after_s: float
) -> tuple[str, Watcher]:
    """Submit one long step and run it to success with ``run_step``, its row watched.
    On PostgreSQL its result is stored in one round trip, against the states the worker
    read with the step (and its own late claim, if it made one)."""
    stored = engine.SEEN_RESULTS["stored"]
    with use_settings(settings.model_copy(update={"claim_after_s": claim_after_s})):
        sent = RecordingDispatcher()
        wid = create(settings, sent, [long_step(tokens)])
        (d,) = sent.sent
        with Watcher(wid) as watcher:
            assert run_step(d.step_run_id, d.attempt, runtime, RecordingDispatcher()) == (
                "succeeded"
            )
    on_server = settings.sqlalchemy_url.startswith("postgresql")
    assert engine.SEEN_RESULTS["stored"] - stored == (1 if on_server else 0)
    return wid, watcher


def test_a_long_step_is_marked_running_while_it_runs(
    settings: Settings, runtime: LlamaCppRuntime
) -> None:
    tokens = _tokens_for(runtime, 0.6)
    wid, watcher = run_watched(settings, runtime, tokens, claim_after_s=0.05)
    a = steps_of(wid)["a"]
    assert a.output is not None and a.output["completion_tokens"] == tokens
    assert watcher.statuses() == [StepStatus.queued, StepStatus.running, StepStatus.succeeded]
    # While it ran, the row said so: this attempt, since the moment it started.
    running = [(n, at) for status, n, at in watcher.seen if status is StepStatus.running]
    assert {n for n, _ in running} == {1} and {at for _, at in running} == {a.started_at}
    assert a.started_at is not None and a.finished_at is not None
    assert (a.finished_at - a.started_at).total_seconds() >= 0.05


def test_a_short_step_is_written_once_by_its_result(
    settings: Settings, runtime: LlamaCppRuntime
) -> None:
    tokens = _tokens_for(runtime, 0.3)
    wid, watcher = run_watched(settings, runtime, tokens, claim_after_s=30.0)
    # Never marked running: queued until its result, which counted the attempt and kept
    # when it started.
    assert watcher.statuses() == [StepStatus.queued, StepStatus.succeeded]
    assert all(n == 0 and at is None for s, n, at in watcher.seen if s is StepStatus.queued)
    a = steps_of(wid)["a"]
    assert a.attempts == 1 and a.started_at is not None and a.finished_at is not None
    assert (a.finished_at - a.started_at).total_seconds() >= 0.1


def test_claim_after_zero_marks_it_running_before_the_model(
    settings: Settings, runtime: LlamaCppRuntime
) -> None:
    tokens = _tokens_for(runtime, 0.3)
    _wid, watcher = run_watched(settings, runtime, tokens, claim_after_s=0.0)
    assert watcher.statuses() == [StepStatus.queued, StepStatus.running, StepStatus.succeeded]


def test_a_late_claim_refused_stops_the_model_and_records_nothing(
    settings: Settings, runtime: LlamaCppRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    # The workflow is cancelled in the database while the step runs unmarked and before
    # any cancel flag reaches the worker: the late claim finds the step gone and stops.
    tokens = _tokens_for(runtime, 2.0)
    with use_settings(settings.model_copy(update={"claim_after_s": 0.3, "cancel_poll_s": 60.0})):
        sent = RecordingDispatcher()
        wid = create(settings, sent, [long_step(tokens)])
        (d,) = sent.sent
        cancel = threading.Timer(0.1, engine.cancel_workflow, args=(wid,))
        cancel.start()
        with caplog.at_level(logging.INFO, logger="workers.steps"):
            assert run_step(d.step_run_id, d.attempt, runtime, RecordingDispatcher()) == "stale"
        cancel.join()
    (stopped,) = (
        m
        for r in caplog.records
        if (
            m := re.search(
                r"no longer this attempt's to run; stopped after (\d+) tokens", r.getMessage()
            )
        )
    )
    assert 0 < int(stopped[1]) < tokens  # the model stopped at the late claim, not the end
    a = steps_of(wid)["a"]
    assert a.status is StepStatus.cancelled and a.output is None
