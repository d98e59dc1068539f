"""Running one step attempt: claim it, call the model, store the result, advance.

:func:`run_step` is the plain function behind the ``corral.step.run`` task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from app import claims, engine
from app.scheduler import live
from app.claims import StepWork
from app.core.config import get_settings
from app.dispatch import CeleryDispatcher, forget_sent
from app.engine import Dispatcher
from app.core.errors import ServiceUnavailable, StepCancelled, StepError, StepSuperseded
from app.workflows.spec import INPUT_MODELS
from workers.celery_app import celery_app
from workers.memory import memory_chat, uses_memory
from workers.runtime import ModelRuntime, RunControl

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        return live.is_cancelled(workflow_id)
    except (RedisError, OSError) as exc:  # Redis blip: keep generating, poll again later.
        log.warning("cannot read the cancel flag of %s: %s", workflow_id, exc)
        return False


def _submit_committed(work: StepWork) -> bool:
    """Whether carried work's workflow was committed (:func:`app.claims.wait_submitted`).
    When it never was (its submit failed after sending it), the step's sent-marker goes:
    should the submit commit after all, the reconciler then sends the step again, as it
    sends any committed step that no marker shows was sent."""
    if claims.wait_submitted(work):
        return True
    log.warning(
        "step %s attempt %s: workflow %s was not committed (its submit failed); dropped",
        work.step_id,
        work.attempt,
        work.workflow_id,
    )
    try:
        forget_sent(live.get_redis(), {work.step_run_id: work.attempt})
    except (RedisError, OSError) as exc:  # it expires; the reconciler finds it confirmed
        log.warning("cannot drop the sent-marker of step %s: %s", work.step_run_id, exc)
    return False


def _written(work: StepWork, write: Callable[[], T]) -> T:
    """``write()``; for carried work whose workflow it did not find (its submit was sent
    before the commit returned), again once the submit has committed. Raises
    :class:`StepSuperseded` when it never did: the result has no workflow to go to."""
    try:
        return write()
    except engine.StepGone:
        if not work.unconfirmed:
            raise
    if not _submit_committed(work):
        raise StepSuperseded("its workflow was not committed")
    return write()


def _late_claim(work: StepWork) -> bool | None:
    """Mark a step running that has run ``claim_after_s``: False when it is no longer this
    attempt's, None when the database cannot be reached now (asked again at the next poll;
    the result claims the step anyway)."""
    try:
        marked = claims.mark_running(work)
        if not marked and work.unconfirmed and _submit_committed(work):
            marked = claims.mark_running(work)  # its submit had not committed yet
        work.unconfirmed = work.unconfirmed and not marked
        return marked
    except ServiceUnavailable as exc:
        log.warning("cannot mark step %s running yet: %s", work.step_id, exc)
        return None


def execute(work: StepWork, runtime: ModelRuntime) -> dict[str, Any]:
    """Call the model for a step, within its timeout and cancellation; a step not yet marked
    running is marked once it has run ``claim_after_s``."""
    settings = get_settings()
    timeout_s = work.timeout_s or settings.default_step_timeout_s
    params = INPUT_MODELS[work.kind].model_validate(work.input).model_dump()
    started = time.monotonic()
    control = RunControl(
        deadline=started + timeout_s,
        timeout_s=timeout_s,
        should_cancel=lambda: _cancel_requested(work.workflow_id),
        poll_s=settings.cancel_poll_s,
        claim=None if work.claimed else lambda: _late_claim(work),
        claim_at=started + settings.claim_after_s,
    )
    _inject_fault(work)
    if work.kind == "generate":
        out = runtime.generate(params, control)
    elif work.kind == "chat" and uses_memory(params):
        # Memory is the workflow's tenant's: read from the workflow, once it is committed.
        if work.unconfirmed and not _submit_committed(work):
            raise StepSuperseded("its workflow was not committed")
        out = memory_chat(work, runtime, params, control)
    elif work.kind == "chat":
        out = runtime.chat(params, control)
    else:
        out = runtime.embed(params, control)
    out.setdefault("timings", {})["queue_ms"] = round(work.queued_ms, 3)
    out["model"] = runtime.name
    out["attempt"] = work.attempt
    return out


def take(step_run_id: str, attempt: int, carried: str | None = None) -> StepWork | None:
    """The step's work, as a worker takes it (from what its message carried, or read);
    None when this delivery is not its to run."""
    # With CORRAL_CLAIM_AFTER_S, the step is read, not claimed: a short one is written once,
    # by its result (Celery's own task_track_started is off by default for the same cost).
    if get_settings().claim_after_s <= 0:
        return claims.claim_step(step_run_id, attempt)
    work = claims.take_carried(carried, step_run_id, attempt) if carried else None
    if work is None:
        return claims.open_step(step_run_id, attempt)
    # Not read: a cancel is seen here, by its flag (the read would have seen the step
    # cancelled). Without the flag (Redis lost it) the step runs and its result is refused.
    if _needs_cancel_check(work) and _cancel_requested(work.workflow_id):
        log.info("dropping step %s attempt %s: its workflow was cancelled", work.step_id, attempt)
        return None
    return work


def _needs_cancel_check(work: StepWork) -> bool:
    """Whether carried work looks at its workflow's cancel flag before the model starts.

    Not when it was sent less than ``cancel_poll_s`` ago and has no effect but its result
    (no conversation memory, no tools): a cancel can only have come in that window, and
    the model's first poll of the flag comes ``cancel_poll_s`` after it starts, so the
    step generates no longer than a step that was running when the cancel came would;
    a result that ends first is refused under the workflow's lock, as every result of a
    cancelled workflow is. That saves a Redis round trip on the way to the model. A step
    that waited longer in its queue (a backlog) is checked and dropped unstarted; a send
    time ahead of this host's clock counts as recent."""
    if work.kind == "chat" and uses_memory(work.input):
        return True
    return work.queued_ms >= get_settings().cancel_poll_s * 1000


def run_step(
    step_run_id: str,
    attempt: int,
    runtime: ModelRuntime | None = None,
    dispatcher: Dispatcher | None = None,
    *,
    carried: str | None = None,
) -> str:
    """Run one attempt of a step end to end; returns what happened, for logs and tests.
    ``carried``: the work its message carried (:func:`app.claims.carry`), if any."""
    dispatcher = dispatcher or CeleryDispatcher(celery_app)
    work = take(step_run_id, attempt, carried)
    if work is None:
        return "stale"
    try:
        return _run(work, runtime, dispatcher)
    except StepSuperseded as exc:
        log.info("step %s attempt %s stopped: %s", work.step_id, attempt, exc)
        return "stale"


def _run(work: StepWork, runtime: ModelRuntime | None, dispatcher: Dispatcher) -> str:
    def fail(error: str, *, retryable: bool) -> str:
        status = _written(
            work,
            lambda: engine.fail_step(
                work.step_run_id,
                work.attempt,
                error,
                retryable=retryable,
                dispatcher=dispatcher,
                started_at=work.started_at,
            ),
        )
        return str(status)

    if work.input_error is not None:
        fail(work.input_error, retryable=False)
        return "failed"
    try:
        if runtime is None:
            from workers.process import get_runtime

            runtime = get_runtime()
        output = execute(work, runtime)
    except StepSuperseded:
        raise
    except StepCancelled as exc:
        # The cancel already recorded the step as cancelled; add what the worker did.
        engine.note_cancelled(work.step_run_id, work.attempt, str(exc), claimed=work.claimed)
        return "cancelled"
    except StepError as exc:
        status = fail(str(exc), retryable=exc.retryable)
        log.info("step %s attempt %s failed (%s): %s", work.step_id, work.attempt, status, exc)
        return status
    except Exception as exc:
        log.exception("step %s attempt %s crashed", work.step_id, work.attempt)
        return fail(f"{type(exc).__name__}: {exc}", retryable=True)
    stored = _written(
        work,
        lambda: engine.complete_step(
            work.step_run_id,
            work.attempt,
            output,
            dispatcher,
            started_at=work.started_at,
            seen=work.seen,
        ),
    )
    return "succeeded" if stored else "discarded"
