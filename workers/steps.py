"""Running one step attempt: claim it, call the model, store the result.

:func:`run_step` is the plain function behind the ``corral.step.run`` task. The claim
and the result go through :mod:`app.workflows.service`, whose rules decide what follows;
then the ended attempt is counted per model in Redis (:mod:`app.governance.model_stats`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from app.core.config import get_settings
from app.core.errors import ServiceUnavailable, StepCancelled, StepError
from app.governance import model_stats
from app.store.tables import utcnow
from app.workflows import engine, events, service, streams
from app.workflows.engine import StepWork
from app.workflows.spec import INPUT_MODELS
from workers.memory import memory_chat, uses_memory
from workers.process import pool_id
from workers.runtime import ModelRuntime, RunControl

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a finished step keeps trying to store its result while the database is down.
STORE_PATIENCE_S = 600.0


class InjectedFault(StepError):
    """A failure injected by CORRAL_FAULT_INJECTION (chaos testing of the retry path)."""


def _inject_fault(work: StepWork) -> None:
    budget = get_settings().fault_plan().get(work.step_id, 0)
    if work.attempt <= budget:
        raise InjectedFault(
            f"injected fault: attempt {work.attempt} of {budget} planned failure(s) "
            f"of step {work.step_id!r}"
        )


def _cancel_requested(workflow_id: str) -> bool:
    try:
        return events.is_cancelled(workflow_id)
    except (RedisError, OSError) as exc:  # a Redis blip: keep generating, poll again later
        log.warning("cannot read the cancel flag of %s: %s", workflow_id, exc)
        return False


def execute(work: StepWork, runtime: ModelRuntime) -> dict[str, Any]:
    """Call the model for a step, within its timeout and its workflow's cancellation."""
    settings = get_settings()
    timeout_s = work.timeout_s or settings.default_step_timeout_s
    params = INPUT_MODELS[work.kind].model_validate(work.input).model_dump()
    # The reply's text goes on the step's token stream as it is decoded.
    writer = (
        streams.DeltaWriter(work.workflow_id, work.step_id, work.attempt)
        if work.kind != "embed"
        else None
    )
    control = RunControl(
        deadline=time.monotonic() + timeout_s,
        timeout_s=timeout_s,
        should_cancel=lambda: _cancel_requested(work.workflow_id),
        poll_s=settings.cancel_poll_s,
        on_text=writer,
    )
    _inject_fault(work)
    try:
        if work.kind == "generate":
            out = runtime.generate(params, control)
        elif work.kind == "chat" and uses_memory(params):
            out = memory_chat(work, runtime, params, control)
        elif work.kind == "chat":
            out = runtime.chat(params, control)
        else:
            out = runtime.embed(params, control)
    finally:
        if writer is not None:
            writer.close()
    out.setdefault("timings", {})["queue_ms"] = round(work.queued_ms, 3)
    out["model"] = runtime.name
    out["pool"] = pool_id() or None  # the pool process that ran it
    out["attempt"] = work.attempt
    return out


def _stored(write: Callable[[], T]) -> T:
    """``write()``, tried again while the database is unavailable: a result already
    computed is not thrown away for an outage (up to :data:`STORE_PATIENCE_S`)."""
    deadline = time.monotonic() + STORE_PATIENCE_S
    delay = 0.5
    while True:
        try:
            return write()
        except ServiceUnavailable as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("cannot store a step's result yet, retrying in %.1f s: %s", delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def run_step(step_run_id: str, attempt: int, runtime: ModelRuntime | None = None) -> str:
    """Run one attempt of a step end to end; what happened, for logs and tests.

    ``stale``: this delivery was not the step's to run. Raises ServiceUnavailable when the
    database cannot be reached to claim the step (the task is retried). Once its result
    is stored, the attempt is added to the per-model counters (:func:`_record`).
    """
    work = service.claim_step(step_run_id, attempt)
    if work is None:
        log.info("dropping step run %s attempt %s: not its to run", step_run_id, attempt)
        return "stale"
    outcome, output = _run_claimed(work, runtime)
    _record(work, outcome, output)
    return outcome


def _run_claimed(work: StepWork, runtime: ModelRuntime | None) -> tuple[str, dict[str, Any] | None]:
    """Run a claimed attempt and store its result: the outcome (``succeeded``,
    ``retrying``, ``failed``, ``cancelled``, ``discarded``) and, when it succeeded, its
    output."""
    step_run_id, attempt = work.step_run_id, work.attempt

    def fail(error: str, *, retryable: bool) -> tuple[str, None]:
        status = _stored(
            lambda: service.fail_step(step_run_id, attempt, error, retryable=retryable)
        )
        return (str(status) if status is not None else "discarded"), None

    if work.input_error is not None:
        return fail(work.input_error, retryable=False)
    try:
        if runtime is None:
            from workers.process import get_runtime

            runtime = get_runtime()
        output = execute(work, runtime)
    except StepCancelled as exc:
        # The cancel already recorded the step as cancelled; add what the worker did.
        detail = str(exc)
        _stored(lambda: engine.note_cancelled(step_run_id, attempt, detail))
        return "cancelled", None
    except StepError as exc:
        status, _ = fail(str(exc), retryable=exc.retryable)
        log.info("step %s attempt %s failed (%s): %s", work.step_id, attempt, status, exc)
        return status, None
    except Exception as exc:
        log.exception("step %s attempt %s crashed", work.step_id, attempt)
        return fail(f"{type(exc).__name__}: {exc}", retryable=True)
    stored = _stored(lambda: service.complete_step(step_run_id, attempt, output))
    return ("succeeded", output) if stored else ("discarded", None)


def _record(work: StepWork, outcome: str, output: dict[str, Any] | None) -> None:
    """Add the ended attempt to the per-model counters in Redis (its result is already
    stored and announced): a failure is logged, never raised."""
    try:
        model_stats.record_step(
            model=work.model,
            kind=work.kind,
            outcome=outcome,
            duration_s=(utcnow() - work.started_at).total_seconds(),
            queue_wait_s=work.queued_ms / 1000,
            output=output,
        )
    except Exception as exc:  # Redis down, or anything else: the step's result stands
        log.warning(
            "could not count step %s attempt %s in the model stats: %s",
            work.step_id,
            work.attempt,
            exc,
        )
