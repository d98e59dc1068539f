"""What happens next in a workflow: pure functions over plain state.

Nothing here touches a database, Redis or the clock. The engine reads a workflow's
state under its lock, asks one of these functions what follows, writes the answer and,
after the commit, sends the steps it names. Every rule of the DAG lives here once:

* a pending step whose dependencies all ended is decided: cancelled when one of them
  failed or was cancelled, skipped when all of them were skipped or its condition is
  false, failed when its condition cannot be evaluated, queued otherwise;
* a delivery may run only the attempt its step is ready for, in a running workflow, or
  the attempt it is running (delivered again after its worker died) (:func:`claim`); a
  stale delivery runs nothing;
* a result is stored only for the attempt that is running (:func:`succeed`,
  :func:`fail`); a failed attempt is retried with backoff while attempts are left;
* a step that fails for good fails the workflow, and every step that has not started
  is cancelled; running steps finish and their results are kept;
* the workflow succeeds when every step succeeded or was skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from jinja2 import TemplateError

from app.store.tables import StepStatus, WorkflowStatus
from app.workflows.templating import evaluate

SENDABLE = frozenset({StepStatus.queued, StepStatus.retrying, StepStatus.waiting_for_pool})
_NOT_SUCCEEDED = frozenset({StepStatus.failed, StepStatus.cancelled})

# Evaluates a step's condition against the workflow's state; raises on a bad expression.
Condition = Callable[[str, Mapping[str, Any]], bool]


@dataclass(frozen=True, slots=True)
class StepDef:
    """What the rules need of a step's spec."""

    id: str
    depends_on: tuple[str, ...] = ()
    when: str | None = None
    max_attempts: int = 1
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> StepDef:
        """From a step of a validated spec (its JSON form)."""
        retry = spec.get("retry") or {}
        return cls(
            id=spec["id"],
            depends_on=tuple(spec.get("depends_on") or ()),
            when=spec.get("when"),
            max_attempts=int(retry.get("max_attempts", 1)),
            backoff_s=float(retry.get("backoff_s", 1.0)),
            max_backoff_s=float(retry.get("max_backoff_s", 60.0)),
        )


@dataclass(frozen=True, slots=True)
class StepState:
    """A step as the rules see it."""

    status: StepStatus = StepStatus.pending
    attempts: int = 0
    output: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Run:
    """A workflow as the rules see it: its status and its steps, in spec order."""

    id: str
    name: str
    status: WorkflowStatus
    steps: Mapping[str, StepState]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """An attempt of a step to put on its model's queue, after ``delay_s``."""

    step_id: str
    attempt: int
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Next:
    """A transition: the run after it, the steps it changed, what to send."""

    run: Run
    changed: frozenset[str]
    sends: tuple[Send, ...] = ()

    @property
    def finished(self) -> bool:
        """Whether this transition ended the workflow."""
        return self.run.status.terminal and "" in self.changed


def start(defs: Mapping[str, StepDef], run: Run) -> Next:
    """A new workflow: decide every step whose dependencies are already done (the roots)."""
    return _Transition(defs, run).settle().done()


def claim(run: Run, step_id: str, attempt: int) -> bool:
    """Whether a delivery of ``attempt`` may start ``step_id`` now: the attempt it is
    ready for, or the one it is running (the broker delivers a task again when the
    worker that held it died; only one result of the attempt is ever stored)."""
    step = run.steps[step_id]
    if run.status is not WorkflowStatus.running:
        return False
    if step.status is StepStatus.running:
        return step.attempts == attempt
    return step.status in SENDABLE and step.attempts == attempt - 1


def started(run: Run, step_id: str, attempt: int) -> Next:
    """The run once ``attempt`` of ``step_id`` has started (after :func:`claim`). The
    engine writes :func:`claim` and this together as one statement
    (:data:`app.store.queries.CLAIM`)."""
    t = _Transition({}, run)
    t.set(step_id, status=StepStatus.running, attempts=attempt, error=None)
    return t.done()


def succeed(
    defs: Mapping[str, StepDef], run: Run, step_id: str, attempt: int, output: Any
) -> Next | None:
    """Store an attempt's output and decide what follows; None when that attempt is no
    longer the step's running one (a duplicate, a cancelled or superseded step)."""
    if not _running(run, step_id, attempt):
        return None
    t = _Transition(defs, run)
    t.set(step_id, status=StepStatus.succeeded, output=output, error=None)
    return t.settle().done()


def fail(
    defs: Mapping[str, StepDef],
    run: Run,
    step_id: str,
    attempt: int,
    error: str,
    *,
    retryable: bool,
    jitter: float = 1.0,
) -> Next | None:
    """Record a failed attempt: retried after a backoff while attempts are left (and the
    failure is ``retryable``), else the step fails and with it the workflow. ``jitter``
    in [0, 1] picks the delay within the backoff's band. None as for :func:`succeed`."""
    if not _running(run, step_id, attempt):
        return None
    t = _Transition(defs, run)
    spec = defs[step_id]
    if retryable and attempt < spec.max_attempts and run.status is WorkflowStatus.running:
        t.set(step_id, status=StepStatus.retrying, error=error)
        delay = backoff_delay(attempt, spec.backoff_s, spec.max_backoff_s, jitter)
        t.sends.append(Send(step_id, attempt + 1, delay))
        return t.done()
    t.set(step_id, status=StepStatus.failed, error=error)
    return t.settle().done()


def cancel(run: Run, reason: str = "cancelled by request") -> Next | None:
    """Cancel a running workflow and every step that has not ended; None if it has ended."""
    if run.status.terminal:
        return None
    t = _Transition({}, run)
    t.end(WorkflowStatus.cancelled, reason)
    for step_id, step in run.steps.items():
        if not step.status.terminal:
            t.set(step_id, status=StepStatus.cancelled, error=reason)
    return t.done()


def backoff_delay(attempt: int, base_s: float, cap_s: float, jitter: float) -> float:
    """Exponential backoff with equal jitter: min(cap, base·2^(attempt-1)) scaled into
    [½, 1] of itself by ``jitter`` in [0, 1]."""
    ceiling = min(cap_s, base_s * 2.0 ** (attempt - 1))
    return ceiling / 2 + ceiling / 2 * min(1.0, max(0.0, jitter))


def ancestors(defs: Mapping[str, StepDef], step_id: str) -> list[str]:
    """Every step ``step_id`` depends on, transitively, in spec order."""
    seen: set[str] = set()
    todo = [step_id]
    while todo:
        for dep in defs[todo.pop()].depends_on:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return [s for s in defs if s in seen]


def context(defs: Mapping[str, StepDef], run: Run, step_id: str) -> dict[str, Any]:
    """What a template or condition of ``step_id`` may read: the workflow, the steps above."""
    steps = {
        sid: {
            "status": run.steps[sid].status.value,
            "output": run.steps[sid].output,
            "attempts": run.steps[sid].attempts,
            "error": run.steps[sid].error,
        }
        for sid in ancestors(defs, step_id)
    }
    return {"workflow": {"id": run.id, "name": run.name}, "steps": steps}


def _running(run: Run, step_id: str, attempt: int) -> bool:
    step = run.steps.get(step_id)
    return step is not None and step.status is StepStatus.running and step.attempts == attempt


class _Transition:
    """A transition being worked out: the steps as changed so far, and what to send."""

    def __init__(self, defs: Mapping[str, StepDef], run: Run) -> None:
        self.defs = defs
        self.run = run
        self.steps = dict(run.steps)
        self.changed: set[str] = set()  # step ids; "" for the workflow itself
        self.sends: list[Send] = []

    def set(self, step_id: str, **values: Any) -> None:
        self.steps[step_id] = replace(self.steps[step_id], **values)
        self.changed.add(step_id)

    def end(self, status: WorkflowStatus, error: str | None) -> None:
        self.run = replace(self.run, status=status, error=error)
        self.changed.add("")

    def settle(self) -> _Transition:
        """Decide every pending step whose dependencies are done, until none is left;
        then the workflow's own status."""
        progress = self.run.status is WorkflowStatus.running
        while progress:
            progress = False
            for step_id, step in self.steps.items():
                if step.status is StepStatus.pending and self._decide(step_id):
                    progress = True
        self._finish()
        return self

    def _decide(self, step_id: str) -> bool:
        deps = [self.steps[d] for d in self.defs[step_id].depends_on]
        if not all(d.status.terminal for d in deps):
            return False
        when = self.defs[step_id].when
        if any(d.status in _NOT_SUCCEEDED for d in deps):
            self.set(
                step_id,
                status=StepStatus.cancelled,
                error="cancelled: a dependency did not succeed",
            )
        elif deps and all(d.status is StepStatus.skipped for d in deps):
            self.set(
                step_id, status=StepStatus.skipped, error="skipped: every dependency was skipped"
            )
        elif when:
            try:
                go = evaluate(when, context(self.defs, self._now(), step_id))
            except (TemplateError, TypeError, ValueError, ArithmeticError) as exc:
                self.set(
                    step_id,
                    status=StepStatus.failed,
                    error=f"condition {when!r} failed to evaluate: {exc}",
                )
                return True
            if go:
                self._queue(step_id)
            else:
                self.set(
                    step_id,
                    status=StepStatus.skipped,
                    error=f"skipped: condition {when!r} is false",
                )
        else:
            self._queue(step_id)
        return True

    def _queue(self, step_id: str) -> None:
        step = self.steps[step_id]
        self.set(step_id, status=StepStatus.queued)
        self.sends.append(Send(step_id, step.attempts + 1))

    def _finish(self) -> None:
        if self.run.status.terminal:
            return
        failed = [sid for sid, s in self.steps.items() if s.status is StepStatus.failed]
        if failed:
            first = failed[0]
            self.end(WorkflowStatus.failed, f"step {first!r} failed: {self.steps[first].error}")
            for step_id, step in self.steps.items():
                if step.status is StepStatus.pending or step.status in SENDABLE:
                    reason = f"cancelled: workflow failed at step {first!r}"
                    self.set(step_id, status=StepStatus.cancelled, error=reason)
            self.sends.clear()
        elif all(s.status.terminal for s in self.steps.values()):
            self.end(WorkflowStatus.succeeded, None)

    def _now(self) -> Run:
        return replace(self.run, steps=self.steps)

    def done(self) -> Next:
        return Next(self._now(), frozenset(self.changed), tuple(self.sends))
