"""Memory consolidation throughput: conversations consolidated per minute at batch sizes
1, 8 and 32.

    python -m benchmarks.consolidation [--n 32] [--batches 1,8,32] [--model NAME] [--json out.json]

Starts its own Redis (or ``CORRAL_BENCH_REDIS_URL``), a SQLite file, ``corral api``, a
``corral worker`` for the consolidation model (``smollm2-135m`` when corral[demo] is
installed, else tiny-chat; ``--model`` names another) and one for ``tiny-embed`` (facts are
embedded). For each batch size it writes ``--n`` conversations of six turns for users of
their own, starts a consolidation run in this process (what beat's tick does) with
``CORRAL_CONSOLIDATE_BATCH`` set to it, and times the run from its start until every
conversation is committed. The table gives conversations per minute, seconds per
conversation, facts and entries stored, and the model's tokens.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from app.core.config import Settings, use_settings
from app.memory import consolidate
from app.memory.service import get_memory
from app.memory.store import NewMessage
from app.store import db, keys
from benchmarks import machine
from benchmarks.streaming import _start, _stop, _wait_ready
from models.catalog import load_catalog
from models.pull import packaged_file

REAL = "smollm2-135m"
TURNS = [
    "Hi, I'm {name}. I work as a {job} in {city}.",
    "Nice to meet you, {name}! What brings you here today?",
    "I'm planning a trip to {place} next spring and I prefer trains to planes.",
    "Trains are a lovely way to travel. Anything else I should know?",
    "I'm vegetarian, and I'm learning {language} for the trip.",
    "Noted: vegetarian, and learning {language}. Have a great trip!",
]
NAMES = ["Ada", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]
JOBS = ["nurse", "teacher", "baker", "pilot", "carpenter", "chemist"]
CITIES = ["Porto", "Lyon", "Graz", "Turku", "Cork", "Bergen", "Ghent"]
PLACES = ["Japan", "Peru", "Norway", "Chile", "Kenya", "Italy"]
LANGUAGES = ["Japanese", "Spanish", "Norwegian", "Swahili", "Italian"]


def turns(i: int) -> list[str]:
    fill = {
        "name": NAMES[i % len(NAMES)],
        "job": JOBS[i % len(JOBS)],
        "city": CITIES[i % len(CITIES)],
        "place": PLACES[i % len(PLACES)],
        "language": LANGUAGES[i % len(LANGUAGES)],
    }
    return [t.format(**fill) for t in TURNS]


def write_conversations(tenant: str, prefix: str, n: int) -> list[str]:
    mem = get_memory()
    cids = []
    for i in range(n):
        conv = mem.conversations.create(tenant, uuid.uuid4().hex, f"{prefix}-{i}", ttl_s=86400)
        texts = turns(i)
        roles = ["user" if j % 2 == 0 else "assistant" for j in range(len(texts))]
        mem.conversations.append(
            tenant, conv, [NewMessage(r, t) for r, t in zip(roles, texts, strict=True)]
        )
        cids.append(conv.id)
    return cids


def one_batch_size(settings: Settings, tenant: str, batch: int, n: int) -> dict[str, Any]:
    prefix = f"b{batch}-{uuid.uuid4().hex[:6]}"
    cids = write_conversations(tenant, prefix, n)
    mem = get_memory()
    with use_settings(settings.model_copy(update={"consolidate_batch": batch})):
        started = time.perf_counter()
        run = consolidate.start("manual", idle_s=0, tenant=tenant, max_items=n)
        assert run is not None
        while True:
            run = consolidate.get_run(run["id"])
            if run["status"] != "running":
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
    done = sum(mem.conversations.get(tenant, c).consolidated_upto == len(TURNS) for c in cids)
    entries = sum(mem.archive.count(tenant, f"{prefix}-{i}") for i in range(n))
    tokens = _tokens(run["workflow_ids"])
    return {
        "batch": batch,
        "n": n,
        "status": run["status"],
        "consolidated": done,
        "seconds": elapsed,
        "per_minute": done / elapsed * 60,
        "facts": run["facts"],
        "merged": run["merged"],
        "entries": entries,
        "workflows": len(run["workflow_ids"]),
        **tokens,
    }


def _tokens(workflow_ids: list[str]) -> dict[str, int]:
    from sqlmodel import col, select

    from app.store.tables import StepRun

    with db.session_scope() as session:
        outputs = session.exec(
            select(StepRun.output).where(col(StepRun.workflow_id).in_(workflow_ids))
        ).all()
    return {
        "prompt_tokens": sum(int((o or {}).get("prompt_tokens", 0)) for o in outputs),
        "completion_tokens": sum(int((o or {}).get("completion_tokens", 0)) for o in outputs),
    }


def run(n: int, batches: list[int], model: str | None) -> dict[str, Any]:
    if model is None:
        model = REAL if packaged_file(load_catalog().get(REAL)) is not None else "tiny-chat"
    work = Path(tempfile.mkdtemp(prefix="corral-consolidation-bench-"))
    procs: dict[str, Any] = {}
    stack = ExitStack()
    try:
        base, url = _start(work, model, procs, stack, extra_workers=["tiny-embed"])
        settings = base.model_copy(
            update={"consolidate_model": model, "memory_embed_model": "tiny-embed"}
        )
        with use_settings(settings):
            with db.session_scope(write=True) as session:
                row, key = keys.create_key(session, "bench-consolidation", admin=True)
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
                _wait_ready(http, model, procs)
                _wait_ready(http, "tiny-embed", procs)
            one_batch_size(settings, str(row.id), 1, 1)  # warm: load, caches
            rows = [one_batch_size(settings, str(row.id), b, n) for b in batches]
            described = machine.describe(settings.sqlalchemy_url, settings.broker_url)
    finally:
        _stop(procs, stack, work)
    return {"model": model, "n": n, "rows": rows, "machine": described}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"memory consolidation, {result['model']} (one pool process), tiny-embed for facts, "
        f"{result['n']} conversations of {len(TURNS)} turns per batch size",
        "",
        "| batch | conversations/min | s/conversation | consolidated | facts (+merged) "
        "| entries | prompt tok | completion tok | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {r['per_minute']:.1f} | {r['seconds'] / max(r['n'], 1):.2f} "
            f"| {r['consolidated']}/{r['n']} | {r['facts']} (+{r['merged']}) | {r['entries']} "
            f"| {r['prompt_tokens']} | {r['completion_tokens']} | {r['status']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="conversations per batch size")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes, comma-separated")
    parser.add_argument("--model", help="consolidation model (default smollm2-135m or tiny)")
    parser.add_argument("--json", type=Path, help="write every figure and the machine here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    result = run(args.n, batches, args.model)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
