"""Consolidation runs: quiet conversations become long-term memory, in batches, at low priority.

Beat's ``corral.memory.consolidate`` (every ``CORRAL_CONSOLIDATE_S``, inside
``CORRAL_CONSOLIDATE_WINDOW``) and ``POST /v1/memory/consolidate`` start a run:

1. it finds conversations idle for ``CORRAL_CONSOLIDATE_IDLE_S`` whose messages go past
   their watermark (``consolidated_upto``), at most ``CORRAL_CONSOLIDATE_MAX_ITEMS``;
2. it claims each one (``…:conv:{cid}:consolidating``, SET NX with a lease of
   ``CORRAL_CONSOLIDATE_LEASE_S``), so two runs never both take a conversation;
3. it submits the claimed ones as workflows of ``CORRAL_CONSOLIDATE_BATCH`` chat steps
   (``memory.task: consolidate``) on the consolidation model, with workflow priority
   ``low``: their steps wait on the model's queue behind every interactive step.

The steps commit what they learn with the watermark (:mod:`app.memory.learn`) and count it
in the run's Redis counters; a run is finished once all its workflows ended, and its row
then holds the counters and the errors of its failed steps. A run whose worker died is
finished by the engine's own recovery (the step is retried); a conversation whose commit
never happened is taken again by a later run once its claim's lease ends.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, cast

from sqlmodel import col, select

from app.core.config import Settings, get_settings
from app.core.errors import NotFoundError, SpecError, UnknownModelError
from app.core.window import in_window
from app.memory.keys import ROOT, Keys, key_id_of
from app.memory.learn import run_counters
from app.memory.service import Memory, default_chat_model, get_memory
from app.store import db
from app.store.tables import ConsolidationRun, StepRun, WorkflowRun, WorkflowStatus, utcnow

log = logging.getLogger(__name__)

COUNTERS = ("conversations", "facts", "merged", "block_edits", "block_skipped")
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def model_of(settings: Settings) -> str | None:
    """The consolidation model: ``CORRAL_CONSOLIDATE_MODEL``, else the first chat model
    whose GGUF is present."""
    return settings.consolidate_model.strip() or default_chat_model(settings)


def tick(now: datetime | None = None) -> dict[str, Any] | None:
    """Beat's tick: finish ended runs, then start one when the window is open (None when
    it is not, or when there is nothing to consolidate)."""
    settings = get_settings()
    finish_ended()
    if not in_window(settings.consolidate_window, now or utcnow()):
        return None
    return start("beat")


def start(
    trigger: str,
    *,
    requested_by: int | None = None,
    idle_s: float | None = None,
    tenant: str | None = None,
    user_id: str | None = None,
    max_items: int | None = None,
    model: str | None = None,
) -> dict[str, Any] | None:
    """Start a run now: find, claim and submit; returns the run as :func:`public` shows it.
    A beat run that finds nothing to do is not recorded (None)."""
    settings, mem = get_settings(), get_memory()
    idle_s = settings.consolidate_idle_s if idle_s is None else idle_s
    max_items = max_items or settings.consolidate_max_items
    if model is not None:
        _check_model(settings, model)
    model = model or model_of(settings)
    options = {"idle_s": idle_s, "max_items": max_items, "tenant": tenant, "user_id": user_id}
    run = ConsolidationRun(trigger=trigger, requested_by=requested_by, model=model, options=options)
    if model is None:
        _insert(run)
        return _end(run.id, "failed", [{"error": "no chat model is present to consolidate with"}])
    found = candidates(mem, idle_s, max_items, tenant=tenant, user_id=user_id)
    claimed = [c for c in found if _claim(mem, run.id, c[0], c[1])]
    if not claimed and trigger == "beat":
        return None
    run.candidates, run.planned = len(found), len(claimed)
    run.options = {**options, "items": [[t, cid] for t, cid, _ in claimed]}
    by_tenant: dict[str, list[tuple[str, str, int]]] = {}
    for item in claimed:
        by_tenant.setdefault(item[0], []).append(item)
    workflow_ids: list[str] = []
    errors: list[dict[str, Any]] = []
    batch = settings.consolidate_batch
    for t, items in by_tenant.items():
        for at in range(0, len(items), batch):
            part = items[at : at + batch]
            try:
                workflow_ids.append(_submit(settings, run.id, model, t, part))
            except Exception as exc:  # the database or the broker is down: free them now
                log.warning("could not submit a consolidation batch: %s", exc)
                errors.append({"error": f"could not submit {len(part)} conversations: {exc}"})
                for _t, cid, _upto in part:
                    release(mem, run.id, t, cid)
    # Recorded once its batches are: a run is finished when all its workflows have ended,
    # which a run without its workflow ids yet would be at once. Steps count what they
    # commit in Redis under the run's id, so they need no row.
    run.workflow_ids, run.errors = workflow_ids, errors
    _insert(run)
    if not workflow_ids:
        return _end(run.id, "failed" if errors else "empty", errors)
    return get_run(run.id)


def _check_model(settings: Settings, name: str) -> None:
    from models.catalog import load_catalog

    try:
        entry = load_catalog(settings.catalog_path).get(name)
    except UnknownModelError as exc:
        raise SpecError.single(("body", "model"), str(exc), "unknown_model") from exc
    if entry.kind != "chat":
        raise SpecError.single(
            ("body", "model"), f"model {name!r} is a {entry.kind} model; name a chat model", "kind"
        )


def _insert(run: ConsolidationRun) -> None:
    with db.session_scope(write=True) as session:
        session.add(run)


def candidates(
    mem: Memory,
    idle_s: float,
    limit: int,
    *,
    tenant: str | None = None,
    user_id: str | None = None,
) -> list[tuple[str, str, int]]:
    """Up to ``limit`` conversations idle ``idle_s`` or longer, with messages past their
    watermark and no claim on them: (tenant, conversation id, last seq), oldest first."""
    seconds, micros = mem.redis.time()
    cutoff = seconds * 1000 + micros // 1000 - int(idle_s * 1000)
    out: list[tuple[str, str, int, float]] = []
    for raw in mem.redis.scan_iter(match=f"{ROOT}:*:convs", count=1000):
        index = raw.decode()
        t, _, rest = index[len(ROOT) + 1 :].partition(":")
        if rest != "convs" or (tenant is not None and t != tenant):
            continue
        k, start = Keys(t), 0
        while True:
            page = cast(
                list[tuple[bytes, float]],
                mem.redis.zrangebyscore(
                    index, "-inf", cutoff, start=start, num=500, withscores=True
                ),
            )
            pipe = mem.redis.pipeline(transaction=False)
            for cid, _ in page:
                pipe.hmget(k.conv(cid.decode()), ["user_id", "seq", "consolidated_upto"])
                pipe.exists(k.consolidating(cid.decode()))
            replies = pipe.execute()
            for (cid, at), meta, claimed in zip(page, replies[::2], replies[1::2], strict=True):
                uid, seq, mark = meta
                if uid is None or claimed or (user_id is not None and uid.decode() != user_id):
                    continue
                if int(seq or 0) > int(mark or 0):
                    out.append((t, cid.decode(), int(seq), at))
            if len(page) < 500:
                break
            start += len(page)
    out.sort(key=lambda c: c[3])
    return [(t, cid, seq) for t, cid, seq, _ in out[:limit]]


def _claim(mem: Memory, run_id: str, tenant: str, cid: str) -> bool:
    lease_ms = int(mem.settings.consolidate_lease_s * 1000)
    return bool(mem.redis.set(Keys(tenant).consolidating(cid), run_id, nx=True, px=lease_ms))


def release(mem: Memory, run_id: str, tenant: str, cid: str) -> None:
    """Drop a run's claim on a conversation (only while it is still that run's)."""
    mem.redis.eval(_RELEASE, 1, Keys(tenant).consolidating(cid), run_id)


def _submit(
    settings: Settings, run_id: str, model: str, tenant: str, items: list[tuple[str, str, int]]
) -> str:
    from app.workflows import service
    from app.workflows.spec import validate_workflow
    from models.catalog import load_catalog

    raw = {
        "name": f"memory consolidation {run_id}",
        "priority": "low",
        "steps": [
            {
                "id": f"c{i}",
                "kind": "chat",
                "model": model,
                "retry": {"max_attempts": 3, "backoff_s": 5},
                "input": {
                    "conversation_id": cid,
                    "max_tokens": settings.consolidate_max_tokens,
                    "temperature": 0,
                    "seed": 0,
                    "memory": {"task": "consolidate", "upto": upto, "run": run_id},
                },
            }
            for i, (_t, cid, upto) in enumerate(items)
        ],
    }
    validated = validate_workflow(raw, load_catalog(settings.catalog_path), settings)
    return service.submit_validated(validated, api_key_id=key_id_of(tenant)).id


def finish_ended() -> int:
    """Finish every running run whose workflows have all ended; returns how many."""
    with db.session_scope() as session:
        ids = session.exec(
            select(ConsolidationRun.id).where(ConsolidationRun.status == "running")
        ).all()
    return sum(_finish_if_ended(run_id) for run_id in ids)


def _finish_if_ended(run_id: str) -> bool:
    with db.session_scope() as session:
        run = session.get(ConsolidationRun, run_id)
        if run is None or run.status != "running":
            return False
        flows = session.exec(
            select(WorkflowRun.status, WorkflowRun.finished_at).where(
                col(WorkflowRun.id).in_(run.workflow_ids)
            )
        ).all()
        if any(not WorkflowStatus(status).terminal for status, _ in flows):
            return False
        failed = _failed_steps(session, run.workflow_ids)
    errors = [*run.errors, *failed]
    status = "succeeded" if not failed else "partial" if len(failed) < run.planned else "failed"
    ended = max((at for _, at in flows if at is not None), default=None)
    _end(run_id, status, errors, ended)
    return True


def _failed_steps(session: Any, workflow_ids: list[str]) -> list[dict[str, Any]]:
    rows = session.exec(
        select(StepRun.workflow_id, StepRun.step_id, StepRun.status, StepRun.error).where(
            col(StepRun.workflow_id).in_(workflow_ids)
        )
    ).all()
    return [
        {"workflow_id": wid, "step": sid, "status": str(status), "error": error}
        for wid, sid, status, error in rows
        if str(status) != "succeeded"
    ]


def _end(
    run_id: str, status: str, errors: list[dict[str, Any]], at: datetime | None = None
) -> dict[str, Any]:
    """Write a run's end: status, errors, the counters its commits left, claims freed."""
    mem = get_memory()
    counts = _counters(mem, run_id)
    with db.session_scope(write=True) as session:
        run = session.get(ConsolidationRun, run_id)
        assert run is not None
        run.status, run.errors, run.finished_at = status, errors, at or utcnow()
        for name in COUNTERS:
            setattr(run, name, counts[name])
        items = list(run.options.get("items", []))
    for tenant, cid in items:
        release(mem, run_id, tenant, cid)
    return get_run(run_id)


def _counters(mem: Memory, run_id: str) -> dict[str, int]:
    raw = cast(dict[bytes, bytes], mem.redis.hgetall(run_counters(run_id)))
    got = {k.decode(): int(v) for k, v in raw.items()}
    return {name: got.get(name, 0) for name in COUNTERS}


def public(run: ConsolidationRun, live: dict[str, int] | None = None) -> dict[str, Any]:
    """A run as the API shows it (a running run's counters read live from Redis)."""
    out = run.model_dump(exclude={"options"})
    out["options"] = {k: v for k, v in run.options.items() if k != "items"}
    if live is not None:
        out.update(live)
    return out


def get_run(run_id: str) -> dict[str, Any]:
    _finish_if_ended(run_id)
    with db.session_scope() as session:
        run = session.get(ConsolidationRun, run_id)
        if run is None:
            raise NotFoundError(f"no consolidation run {run_id!r}")
    live = _counters(get_memory(), run_id) if run.status == "running" else None
    return public(run, live)


def list_runs(limit: int = 50) -> list[dict[str, Any]]:
    """Runs, newest first (running ones finished first when they have ended)."""
    finish_ended()
    with db.session_scope() as session:
        runs = session.exec(
            select(ConsolidationRun).order_by(col(ConsolidationRun.started_at).desc()).limit(limit)
        ).all()
    mem = get_memory()
    return [public(r, _counters(mem, r.id) if r.status == "running" else None) for r in runs]
