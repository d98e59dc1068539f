"""A worker's side of a step: take one delivered attempt, and mark it running.

A delivery names a step run and an attempt. It is this worker's to run only while the step
is ready for exactly that attempt in a running workflow; a duplicate, a stale attempt or a
cancelled step finds nothing here and is dropped. Taking a step reads what the worker
needs (its kind, model, input rendered against the steps above it). :func:`claim_step`
also writes the claim; :func:`open_step` leaves it for :func:`mark_running`, once the step
has run a while, or for its result (:func:`app.engine.complete_step`), which claims a step
still ready for its attempt under the workflow lock. On a database server a new workflow's
only ready step carries what the read would give in its message (:func:`carry`), and its
worker takes that instead (:func:`take_carried`): no round trip before the model runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from sqlalchemy import Connection

from app import prepared, rows, specs
from app.store import db
from app.store.tables import StepStatus, utcnow
from app.workflows.templating import render_value

log = logging.getLogger(__name__)


@dataclass
class StepWork:
    """What a worker needs to run one claimed attempt of a step."""

    step_run_id: str
    workflow_id: str
    step_id: str
    kind: str
    model: str
    attempt: int
    input: dict[str, Any]
    timeout_s: float | None
    queued_ms: float
    started_at: datetime
    claimed: bool = True  # False until mark_running (or never: the result claims it)
    input_error: str | None = None
    seen: rows.Seen | None = None  # the workflow's states when it was taken (PostgreSQL)
    # Taken from its message (:func:`take_carried`), whose submit may have sent it before
    # its commit returned: until a write finds the workflow, not finding it means "wait
    # for the submit" (:func:`wait_submitted`), not "gone".
    unconfirmed: bool = False


def claim_step(step_run_id: str, attempt: int) -> StepWork | None:
    """Mark one attempt of a step running; None when this delivery is stale or a duplicate."""
    return _take(step_run_id, attempt, claim=True)


def open_step(step_run_id: str, attempt: int) -> StepWork | None:
    """What :func:`claim_step` returns, without writing the claim: the step stays as it is
    (``queued``) until :func:`mark_running` or its result. None when this delivery is stale
    or a duplicate. Nothing is written, so on SQLite this never waits for the write lock
    and on a database server it commits nothing."""
    return _take(step_run_id, attempt, claim=False)


# The message header a step's first message carries its work in (:func:`carry`), and the
# longest text it carries: a workflow whose spec makes it longer is read at the claim.
WORK_HEADER = "corral_work"
CARRY_MAX = 16 * 1024


def carry(
    workflow_id: str,
    spec: Mapping[str, Any],
    step: rows.StepState,
    steps: Iterable[rows.StepState],
    queued_at: datetime,
) -> str | None:
    """What the message of a new workflow's only ready step carries (JSON text), so that
    its worker takes the step without reading it: the step's row as :func:`open_step`
    reads it, the workflow's spec, and its steps' states as written (the states its
    result is settled against, :class:`app.rows.Seen`). None when it would be longer than
    :data:`CARRY_MAX`.

    Only a step that nothing else in its workflow runs beside may carry its work: until
    its result, the workflow's rows change only by a cancel (its flag in Redis, which the
    worker checks before it starts a step that waited in its queue, and at the model's
    polls: :func:`workers.steps.take`) or an operator. Its result is checked against the
    rows under the workflow's lock, as every result is, so a delivery that is no longer
    the step's (a duplicate, a cancel whose flag was lost) has its result refused."""
    text = json.dumps(
        {
            "step_run_id": step.id,
            "attempt": step.attempts + 1,
            "workflow_id": workflow_id,
            "step_id": step.step_id,
            "model": step.model,
            "queued_at": queued_at.isoformat(),
            "spec": spec,
            "steps": [
                [s.id, s.step_id, s.model, s.status.value, s.attempts, s.max_attempts]
                for s in steps
            ],
        },
        separators=(",", ":"),
    )
    return text if len(text) <= CARRY_MAX else None


def take_carried(text: str, step_run_id: str, attempt: int) -> StepWork | None:
    """The work a step's message carried (:func:`carry`), taken without a read and without
    a claim (:func:`mark_running` or the result writes it, as after :func:`open_step`).
    None when the text is not this delivery's first attempt of a step with nothing above
    it (the step is then read)."""
    now = utcnow()
    try:
        carried = json.loads(text)
        if carried["step_run_id"] != step_run_id or not carried["attempt"] == attempt == 1:
            return None
        workflow_id, step_id = carried["workflow_id"], carried["step_id"]
        spec = specs.cached(workflow_id) or specs.remember(workflow_id, carried["spec"])
        step_spec = spec.steps[step_id]
        if step_spec.get("depends_on"):
            return None
        states = [
            (sid, spec_id, model, StepStatus(status), n, most)
            for sid, spec_id, model, status, n, most in carried["steps"]
        ]
        queued_at = datetime.fromisoformat(carried["queued_at"])
        model = carried["model"]
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("step %s: its message carried unusable work (%s); reading it", step_run_id, exc)
        return None
    # The states as written are the ones a result settles against on a database server.
    seen = None
    if not db.reads_in_process():
        seen = rows.Seen.of(workflow_id, spec.name, step_id, [states])
    taken = (workflow_id, step_id, step_spec["kind"], model, queued_at, None)
    work = _work(step_run_id, attempt, taken, spec, (), now, claimed=False, seen=seen)
    work.unconfirmed = True
    return work


# How long a worker looks for a carried step's workflow that its first write did not find,
# before it takes the submit as failed: the pauses between looks (seconds).
SUBMIT_LOOKS_S = (0.05, 0.25, 1.0)


def submitted(workflow_id: str) -> bool:
    """Whether a workflow is committed, once its submit's transaction (if one is open) has
    ended: one round trip that waits on the submit's lock (:data:`app.rows.SUBMIT_LOCK`),
    then looks for the workflow. False: its submit rolled back, or has not reached the
    database yet."""
    params = {"workflow_id": workflow_id}
    with db.connection_scope(autocommit=True) as conn:
        _, found = prepared.script(conn, [(rows.SUBMIT_WAIT, params), (rows.EXISTS, params)])
        return found.first() is not None


def wait_submitted(work: StepWork) -> bool:
    """For carried work (:attr:`StepWork.unconfirmed`) that a write did not find: whether
    its workflow was committed after all, looked for again over about a second
    (:data:`SUBMIT_LOOKS_S`: its submit's first statement may not have reached the
    database when the write ran). True also for work already confirmed."""
    for pause in (0.0, *SUBMIT_LOOKS_S):
        if not work.unconfirmed:
            return True
        time.sleep(pause)
        work.unconfirmed = not submitted(work.workflow_id)
    return not work.unconfirmed


def mark_running(work: StepWork) -> bool:
    """The claim :func:`open_step` left out, written once the step has run a while: the
    step is ``running`` since ``work.started_at``. False when the step is no longer this
    attempt's to run (cancelled, its workflow ended, or finished by another delivery)."""
    params = rows.claim_params(work.step_run_id, work.attempt, work.started_at)
    params["updated_at"] = utcnow()
    with db.connection_scope(write=True, autocommit=True) as conn:
        marked = prepared.execute(conn, rows.MARK_RUNNING, params).first() is not None
    work.claimed = marked
    if work.seen is not None:  # the states its result settles against include the claim
        work.seen = work.seen.running(work.attempt) if marked else None
    return marked


def _take(step_run_id: str, attempt: int, *, claim: bool) -> StepWork | None:
    # A claim changes only its own step's row, so it is one conditional UPDATE: no workflow
    # lock. A writer that holds the lock (a cancel, a failing sibling) and overwrites the
    # row afterwards wins, and the worker then finds its result refused. The UPDATE is the
    # only write and what else is read no longer changes (the spec; finished steps), so on
    # a database server it runs without a transaction around it: one round trip. Without
    # the claim it is the same conditions as a read.
    #
    # On a database server the same round trip reads the workflow's states, which its
    # result may then settle against in memory (:class:`app.rows.Seen`): the result is
    # one round trip instead of two. A script without BEGIN is one implicit transaction,
    # so after a claim they include it. SQLite reads in process: no round trip to save.
    now = utcnow()
    with db.connection_scope(write=claim, autocommit=True) as conn:
        statements: list[prepared.Statement] = [
            (rows.CLAIM if claim else rows.OPEN, rows.claim_params(step_run_id, attempt, now))
        ]
        if conn.dialect.name == "postgresql":
            statements.append((rows.STEPS_BY_STEP, {"step_run_id": step_run_id}))
        found_rows = prepared.script(conn, statements)
        taken = found_rows[0].first()
        if taken is None:
            _log_stale(conn, step_run_id, attempt)
            return None
        workflow_id, step_id, kind, model, queued_at, error, spec_json = taken
        spec = specs.cached(workflow_id) or specs.remember(workflow_id, json.loads(spec_json))
        # Taken: the workflow was running (a condition of the claim and of the read).
        seen = rows.Seen.of(workflow_id, spec.name, step_id, found_rows[1:])
        # The steps its templates may read are finished: their rows no longer change.
        above = specs.ancestors(spec.steps, step_id)
        found = (
            conn.execute(
                rows.CONTEXT, {"workflow_id": workflow_id, "step_ids": sorted(above)}
            ).all()
            if above
            else []
        )
    return _work(
        step_run_id,
        attempt,
        (workflow_id, step_id, kind, model, queued_at, error),
        spec,
        found,
        now,
        claimed=claim,
        seen=seen,
    )


def _work(
    step_run_id: str,
    attempt: int,
    taken: tuple[str, str, str, str, datetime | None, str | None],
    spec: specs.Spec,
    found: Iterable[Sequence[Any]],
    now: datetime,
    *,
    claimed: bool,
    seen: rows.Seen | None,
) -> StepWork:
    """The work of a step taken at ``now``: its row's columns (``taken``), its workflow's
    spec and the rows of the finished steps its templates may read (``found``), its input
    rendered against them."""
    workflow_id, step_id, kind, model, queued_at, error = taken
    step_spec = spec.steps[step_id]
    context_steps = {
        sid: {"status": st.value, "output": out, "attempts": n, "error": err}
        for sid, st, out, n, err in found
    }
    context_steps[step_id] = {
        "status": StepStatus.running.value,
        "output": None,
        "attempts": attempt,
        "error": error,
    }
    context = {"workflow": {"id": workflow_id, "name": spec.name}, "steps": context_steps}
    work = StepWork(
        step_run_id=step_run_id,
        workflow_id=workflow_id,
        step_id=step_id,
        kind=kind,
        model=model,
        attempt=attempt,
        input=step_spec["input"],
        timeout_s=step_spec.get("timeout_s"),
        queued_ms=((now - queued_at).total_seconds() * 1000) if queued_at else 0.0,
        started_at=now,
        claimed=claimed,
        seen=seen,
    )
    # Rendered after the commit: what it reads no longer changes.
    try:
        work.input = render_value(step_spec["input"], context)
    except (TemplateError, TypeError, ValueError) as exc:
        work.input_error = f"input template failed to render: {exc}"
    return work


def _log_stale(conn: Connection, step_run_id: str, attempt: int) -> None:
    found = prepared.execute(conn, rows.STALE, {"step_run_id": step_run_id}).first()
    if found is None:
        log.info("dropping delivery of step %s attempt %s: no such step run", step_run_id, attempt)
        return
    log.info(
        "dropping stale delivery of step %s attempt %s (%s, attempt %s)",
        step_run_id,
        attempt,
        found[0],
        found[1],
    )
