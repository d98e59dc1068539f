"""Streamed chat through Corral's OpenAI API against the same call in process.

    python -m benchmarks.streaming [--n 30] [--max-tokens 64] [--json out.json]

Starts its own Redis (or ``CORRAL_BENCH_REDIS_URL``), a SQLite file (or
``CORRAL_BENCH_DATABASE_URL``), ``corral api`` and ``corral worker`` on ``smollm2-135m``
(corral[demo]; tiny-chat when it is not installed, said in the table), and loads the same
GGUF with ``llama_cpp.Llama`` in this process. Each round asks both the same question,
one after the other (the order alternates), streamed at temperature 0:

- Corral: ``POST /v1/chat/completions`` with ``stream: true`` over one kept-alive HTTP
  connection; time to the first content chunk, and tokens/s from it to the last chunk;
- in process: ``create_chat_completion(stream=True)``, timed the same way.

It prints medians side by side and the added time to first token (median of the
per-round differences); the target is under 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from app.core.config import Settings, settings_env, use_settings
from app.core.embedded import EmbeddedRedis, free_port
from app.store import db, keys
from app.store.migrate import upgrade
from benchmarks import machine, stats
from models.catalog import load_catalog
from models.pull import packaged_file, pull
from models.tiny import make_tiny

REAL = "smollm2-135m"
TARGET_MS = 10.0
QUESTIONS = [
    "What is the capital of {}? Answer in one sentence.",
    "Name one famous landmark in {}.",
    "Describe the weather in {} in one sentence.",
]
PLACES = ["France", "Italy", "Spain", "Japan", "Peru", "Kenya", "Canada", "Norway", "Chile"]


def question(i: int) -> list[dict[str, str]]:
    """A different question each round: no round reuses the previous prompt's cache."""
    text = QUESTIONS[i % len(QUESTIONS)].format(PLACES[i % len(PLACES)])
    return [{"role": "user", "content": f"{text} (#{i})"}]


def in_process(llm: Any, messages: list[dict[str, str]], max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = last = 0.0
    pieces = 0
    for chunk in llm.create_chat_completion(
        messages, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
            pieces += 1
    return {"ttft_ms": (first - started) * 1000, "decode_s": last - first, "pieces": pieces}


def through_corral(
    http: httpx.Client, model: str, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, float]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    accepted = first = last = 0.0
    usage: dict[str, int] = {}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            accepted = accepted or time.perf_counter()  # the role chunk: submitted
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return {
        "accepted_ms": (accepted - started) * 1000,
        "ttft_ms": (first - started) * 1000,
        "decode_s": last - first,
        "tokens": float(usage.get("completion_tokens", 0)),
    }


def _start(
    work: Path,
    model: str,
    procs: dict[str, subprocess.Popen[bytes]],
    stack: ExitStack,
    extra_workers: tuple[str, ...] | list[str] = (),
) -> tuple[Settings, str]:
    redis_url = os.environ.get("CORRAL_BENCH_REDIS_URL")
    if not redis_url:
        server = EmbeddedRedis(work / "redis", persist=False).start()
        stack.callback(server.stop)
        redis_url = server.url
    models = work / "models"
    make_tiny(models, ["tiny-chat", "tiny-embed"])
    if model == REAL:
        pull(load_catalog().get(REAL), models, progress=False)
    database_url = os.environ.get("CORRAL_BENCH_DATABASE_URL") or f"sqlite:///{work / 'c.db'}"
    settings = Settings(
        database_url=database_url, redis_url=redis_url, models_dir=models, data_dir=work / "data"
    )
    upgrade(settings.sqlalchemy_url)
    env = settings_env(settings)
    env.pop("CORRAL_API_KEY", None)
    port = free_port()
    logs = work / "logs"
    logs.mkdir()
    commands = {
        "api": ["api", "--port", str(port)],
        "worker": ["worker", "--model", model, "--gpu", "none", "--concurrency", "1"],
    }
    for extra in extra_workers:
        commands[extra] = ["worker", "--model", extra, "--gpu", "none", "--concurrency", "1"]
    for name, args in commands.items():
        with (logs / f"{name}.log").open("ab") as out:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "app.cli.main", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
    return settings, f"http://127.0.0.1:{port}"


def _stop(procs: dict[str, Any], stack: ExitStack, work: Path) -> None:
    """Stop what :func:`_start` started and remove its directory."""
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        proc.wait(20)
    db.dispose_engines()
    stack.close()
    shutil.rmtree(work, ignore_errors=True)


def _wait_ready(http: httpx.Client, model: str, procs: dict[str, Any]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs.values()):
            raise RuntimeError("a process exited while starting; see its log")
        try:
            live = {m["name"]: m["workers"] for m in http.get("/v1/catalog").json()}
            if live.get(model):
                return
        except (httpx.HTTPError, ValueError, TypeError):
            pass
        time.sleep(0.3)
    raise RuntimeError("the worker did not come up in 180 s")


def run(n: int, max_tokens: int) -> dict[str, Any]:
    from llama_cpp import Llama

    entry = load_catalog().get(REAL)
    model = REAL if packaged_file(entry) is not None else "tiny-chat"
    work = Path(tempfile.mkdtemp(prefix="corral-stream-bench-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stack = ExitStack()
    try:
        settings, url = _start(work, model, procs, stack)
        with use_settings(settings), db.session_scope(write=True) as session:
            _row, key = keys.create_key(session, "bench-streaming")
        n_ctx = load_catalog().get(model).n_ctx
        llm = Llama(
            str(settings.models_path / load_catalog().get(model).file),
            n_ctx=n_ctx,
            n_batch=min(512, n_ctx),
            seed=0,
            verbose=False,
        )
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
            _wait_ready(http, model, procs)
            for i in range(3):  # warm both: first loads, caches, connections
                through_corral(http, model, question(1000 + i), max_tokens)
                in_process(llm, question(1000 + i), max_tokens)
            rows = []
            for i in range(n):
                messages = question(i)
                if i % 2:
                    local = in_process(llm, messages, max_tokens)
                    corral = through_corral(http, model, messages, max_tokens)
                else:
                    corral = through_corral(http, model, messages, max_tokens)
                    local = in_process(llm, messages, max_tokens)
                rows.append({"corral": corral, "local": local})
        llm.close()
        described = machine.describe(settings.sqlalchemy_url, settings.broker_url)
    finally:
        _stop(procs, stack, work)
    return {"model": model, "n": n, "max_tokens": max_tokens, "rows": rows, "machine": described}


def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    c_ttft = [r["corral"]["ttft_ms"] for r in rows]
    l_ttft = [r["local"]["ttft_ms"] for r in rows]
    added = [r["corral"]["ttft_ms"] - r["local"]["ttft_ms"] for r in rows]
    c_tps = [
        r["corral"]["tokens"] / r["corral"]["decode_s"] for r in rows if r["corral"]["decode_s"]
    ]
    # In process, the same request produces the same tokens (greedy): Corral's usage counts them.
    l_tps = [r["corral"]["tokens"] / r["local"]["decode_s"] for r in rows if r["local"]["decode_s"]]
    med = statistics.median
    added_med = med(added)
    lines = [
        f"streamed chat, {result['model']}, {result['max_tokens']} tokens max, "
        f"{result['n']} interleaved rounds, medians",
        "",
        "| figure | Corral (OpenAI API, SSE) | llama-cpp-python in process | Corral −/÷ it |",
        "|---|---|---|---|",
        f"| time to first token, ms | {med(c_ttft):.2f} | {med(l_ttft):.2f} | "
        f"+{added_med:.2f} ms (p95 {stats.pct(added, 95):.2f}) |",
        f"| of which: request accepted (the role chunk), ms | "
        f"{med([r['corral']['accepted_ms'] for r in rows]):.2f} | | |",
        f"| tokens/s after the first | {med(c_tps):.1f} | {med(l_tps):.1f} | "
        f"{med(c_tps) / med(l_tps):.3f}× |",
        "",
        f"added time to first token: {added_med:.2f} ms median, target < {TARGET_MS:g} ms: "
        + ("met" if added_med < TARGET_MS else "NOT met"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write every round and the machine here")
    args = parser.parse_args(argv)
    result = run(args.n, args.max_tokens)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
