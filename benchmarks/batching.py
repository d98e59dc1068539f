"""Continuous batching: concurrent chat steps through one pool against llama.cpp's batch API.

    python -m benchmarks.batching [--model smollm2-135m] [--concurrency 1,2,4,8] [--tokens 64]
                                  [--rounds 3] [--parallel 8] [--json out.json]

For each concurrency N, N chat steps of ``--tokens`` tokens each (temperature 0, end of
sequence suppressed, a different question each), three ways, side by side in every round
(the order rotates):

- ``in process``: the limit on this machine. The GGUF loaded in this process through
  llama.cpp's low-level API, one context with ``n_seq_max`` = N, the N chat-templated
  prompts in one ``llama_batch`` with N sequence ids, then one token of every sequence per
  ``llama_decode``, greedy, to ``--tokens`` each;
- ``Corral, 1 slot``: ``corral worker --model M`` (one step at a time), the N steps
  submitted together over HTTP (``POST /v1/workflows?wait_s=``, one client thread each);
- ``Corral, batched``: the same steps to ``corral worker --model M --parallel P`` (P =
  ``--parallel``, the largest concurrency by default), served under a second catalog name
  for the same file so that both pools run at once.

Tokens/s is all the sequences' tokens over the wall time from the first submit to the last
result; a step's latency is its own request's. Memory: each pool process's RSS after it
loaded its model and at the end, beside Corral's scheduler estimate for 1 and P slots.
Results go to ``benchmarks/results/<date>-batching.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from app.core.config import Settings, settings_env, use_settings
from app.core.embedded import EmbeddedRedis, free_port
from app.scheduler import live
from app.scheduler.service import estimate_for
from app.store import db, keys
from app.store.migrate import upgrade
from benchmarks import machine, stats
from benchmarks.client import BenchClient, open_client
from benchmarks.inprocess import InProcess, messages
from benchmarks.overhead import wait_done
from benchmarks.stack import _spawn
from benchmarks.streaming import _wait_ready
from models.catalog import CATALOG_PATH, load_catalog
from models.pull import packaged_file, pull
from models.tiny import make_tiny

REAL = "smollm2-135m"
PATHS = ("in_process", "corral_1", "corral_batched")
LABELS = {"in_process": "in process", "corral_1": "Corral, 1 slot", "corral_batched": "Corral"}
RATIO_TARGET = 0.85  # Corral batched ÷ in process, tokens/s, at 8 concurrent steps: at least
SPREAD_TARGET = 1.5  # the last step's latency ÷ the first's, Corral batched: at most
TARGET_AT = 8
WAIT_S = 60.0  # the most a submit may wait (the API says)
MIB = 1024**2


def chat_spec(model: str, chat: list[dict[str, str]], tokens: int) -> dict[str, Any]:
    """A one-step workflow: a chat step of exactly ``tokens`` tokens, greedy."""
    step_input = {"messages": chat, "max_tokens": tokens, "temperature": 0, "seed": 1}
    step_input |= {"ignore_eos": True, "repeat_penalty": 1.0}
    return {
        "name": "bench-batching",
        "steps": [{"id": "chat", "kind": "chat", "model": model, "input": step_input}],
    }


def through_corral(clients: list[BenchClient], model: str, tokens: int, n: int) -> dict[str, Any]:
    """``n`` chat steps submitted together, one client thread each, each waiting for its end."""
    gate = threading.Barrier(n)
    got: list[tuple[float, float, dict[str, Any]] | BaseException | None] = [None] * n

    def one(i: int) -> None:
        try:
            spec = chat_spec(model, messages(i), tokens)
            gate.wait()
            sent = time.perf_counter()
            resp = clients[i].post("/v1/workflows", json=spec, params={"wait_s": WAIT_S})
            if resp.status_code not in (200, 202):
                raise RuntimeError(f"submit refused: HTTP {resp.status_code} {resp.text[:300]}")
            run: dict[str, Any] = resp.json()
            if run["status"] == "running":
                run = wait_done(clients[i], run["id"])
            got[i] = (sent, time.perf_counter(), run)
        except BaseException as exc:  # reported by the caller
            got[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done: list[tuple[float, float, dict[str, Any]]] = []
    for item in got:
        if not isinstance(item, tuple):
            raise RuntimeError(f"a step failed: {item!r}")
        if item[2]["status"] != "succeeded":
            raise RuntimeError(f"a benchmark step did not succeed: {item[2]}")
        done.append(item)
    outputs = [run["steps"][0]["output"] for _s, _e, run in done]
    first_sent = min(s for s, _e, _r in done)
    return {
        "wall_s": max(e for _s, e, _r in done) - first_sent,
        "latency_ms": [(e - s) * 1000 for s, e, _r in done],
        "completion_tokens": [int(o["completion_tokens"]) for o in outputs],
        "prompt_tokens": [int(o["prompt_tokens"]) for o in outputs],
        "model_ms": [o["timings"]["total_ms"] for o in outputs],
        "texts": [o["text"] for o in outputs],
    }


def parallel_option() -> bool:
    """Whether ``corral worker`` takes ``--parallel`` (the batching runtime) in this checkout."""
    from app.cli import main

    return "parallel" in inspect.signature(main.worker).parameters


def _catalog(work: Path, model: str, batched: str, parallel: int) -> Path:
    """Corral's catalog, plus ``batched``: the same file under a name of its own."""
    data = yaml.safe_load(CATALOG_PATH.read_text())
    entry = next(m for m in data["models"] if m["name"] == model)
    data["models"].append({**entry, "name": batched, "parallel": parallel})
    path = work / "catalog.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rss(pid: int) -> dict[str, float]:
    """Resident memory of ``pid`` now and at its peak (VmRSS, VmHWM), MiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": found.get("VmRSS", 0.0), "peak_mib": found.get("VmHWM", 0.0)}


def announced(pools: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What each path's pool process announces once its model is loaded (pid, n_ctx)."""
    by_model = {w["model"]: w for w in live.live_workers()}
    return {path: by_model[model] for path, model in pools.items()}


# ---- the run ---------------------------------------------------------------------------


def _summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    """One path at one concurrency: the median over rounds of each round's figures."""
    per_round = []
    for r in runs:
        lat = r["latency_ms"]
        order = sorted(range(len(lat)), key=lambda i: r["latency_ms"][i])
        first, last = lat[order[0]], lat[order[-1]]
        per_round.append(
            {
                "tok_s": r["tok_s"],
                "p50_ms": stats.pct(lat, 50),
                "p99_ms": stats.pct(lat, 99),
                "first_ms": first,
                "last_ms": last,
                "last_over_first": last / first,
            }
        )
    return {k: round(statistics.median(p[k] for p in per_round), 3) for k in per_round[0]}


def _ratios(runs: list[dict[str, Any]], n: int) -> float | None:
    """Corral batched ÷ in process, tokens/s: the median of the rounds' ratios."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["n"] == n:
            by_round.setdefault(r["round"], {})[r["path"]] = r["tok_s"]
    ratios = [p["corral_batched"] / p["in_process"] for p in by_round.values() if len(p) == 3]
    return round(statistics.median(ratios), 3) if ratios else None


def _agreement(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per Corral path, the share of its sequences whose text is the in-process one (the
    same greedy tokens; a different batch can round a close call the other way)."""
    local = {(r["round"], r["n"]): r["texts"] for r in runs if r["path"] == "in_process"}
    out = {}
    for path in PATHS[1:]:
        pairs = [
            (a.strip(), b.strip())
            for r in runs
            if r["path"] == path
            for a, b in zip(r["texts"], local[(r["round"], r["n"])], strict=True)
        ]
        if pairs:
            out[path] = round(sum(a == b for a, b in pairs) / len(pairs), 3)
    return out


def run(
    model: str | None,
    concurrency: list[int],
    tokens: int,
    rounds: int,
    parallel: int | None,
    threads: int | None = None,
) -> dict[str, Any]:
    if model is None:
        model = REAL if packaged_file(load_catalog().get(REAL)) is not None else "tiny-chat"
    parallel = parallel or max(concurrency)
    batched_ok = parallel_option()
    batched = f"{model}-batched"
    work = Path(tempfile.mkdtemp(prefix="corral-batching-bench-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    exit_stack = ExitStack()
    exit_stack.callback(shutil.rmtree, work, ignore_errors=True)
    try:
        server = EmbeddedRedis(work / "redis", persist=False).start()
        exit_stack.callback(server.stop)
        models = work / "models"
        make_tiny(models, ["tiny-chat"])
        entry = load_catalog().get(model)
        if not entry.tiny:
            pull(entry, models, progress=False)
        settings = Settings(
            database_url=f"sqlite:///{work / 'c.db'}",
            redis_url=server.url,
            models_dir=models,
            data_dir=work / "data",
            catalog_path=_catalog(work, model, batched, parallel),
            n_threads=threads,  # the pools' llama.cpp threads (CORRAL_N_THREADS), and ours
        )
        upgrade(settings.sqlalchemy_url)
        env = settings_env(settings)
        env.pop("CORRAL_API_KEY", None)
        port = free_port()
        (work / "logs").mkdir()
        cpu = ["--gpu", "none", "--concurrency", "1"]
        commands = {
            "api": ["api", "--port", str(port)],
            "corral_1": ["worker", "--model", model, *cpu, *(["--parallel", "1"] * batched_ok)],
        }
        if batched_ok:
            commands["corral_batched"] = ["worker", "--model", batched, *cpu]
            commands["corral_batched"] += ["--parallel", str(parallel)]
        exit_stack.callback(_stop, procs)  # whatever started, if the next one fails
        for name, args in commands.items():
            procs[name] = _spawn(args, env, work / "logs" / f"{name}.log")
        pools = {"corral_1": model} | ({"corral_batched": batched} if batched_ok else {})
        path = settings.models_path / entry.file
        with use_settings(settings):
            with db.session_scope(write=True) as session:
                _row, key = keys.create_key(session, "bench-batching")
            result = _measure(
                settings, f"http://127.0.0.1:{port}", key, pools, procs, path, entry.n_ctx,
                concurrency, tokens, rounds, parallel,
            )  # fmt: skip
    except BaseException:
        for name in procs:
            log = work / "logs" / f"{name}.log"
            if log.exists():
                print(f"--- {name}.log\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        exit_stack.close()
        db.dispose_engines()
    result.update(model=model, batched_available=batched_ok, parallel=parallel)
    if not batched_ok:
        result["batched_reason"] = "this checkout's `corral worker` has no --parallel"
    return result


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _measure(
    settings: Settings,
    url: str,
    key: str,
    pools: dict[str, str],
    procs: dict[str, Any],
    gguf: Path,
    n_ctx: int,
    concurrency: list[int],
    tokens: int,
    rounds: int,
    parallel: int,
) -> dict[str, Any]:
    load_start = [round(x, 2) for x in os.getloadavg()]
    headers = {"Authorization": f"Bearer {key}"}
    import httpx

    with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        for model in pools.values():
            _wait_ready(http, model, procs)
    pools_info = announced(pools)
    pids = {p: int(info["pid"]) for p, info in pools_info.items()}
    loaded = {p: rss(pid) for p, pid in pids.items()}
    # Each sequence gets the context a batched pool's sequence gets (else the catalog's).
    n_ctx_seq = int(pools_info.get("corral_batched", {}).get("n_ctx") or n_ctx)
    local = InProcess(gguf, n_ctx_seq=n_ctx_seq, threads=settings.n_threads)
    prompts = [local.prompt(messages(i)) for i in range(max(concurrency))]
    for n in concurrency:
        local.context(n)
    clients = [open_client("stdlib", url, headers, WAIT_S + 30) for _ in range(max(concurrency))]
    paths = ["in_process", *pools]
    runs: list[dict[str, Any]] = []
    try:

        def one(path: str, n: int) -> dict[str, Any]:
            if path == "in_process":
                return local.run(prompts[:n], tokens)
            return through_corral(clients, pools[path], tokens, n)

        for n in concurrency:  # warm: each context's first decode allocates its buffers
            one("in_process", n)
        for path in pools:  # the connections, the pools' first steps
            one(path, max(concurrency))
        for r in range(rounds):
            for i, n in enumerate(concurrency):
                shift = (r + i) % len(paths)
                for path in paths[shift:] + paths[:shift]:
                    got = one(path, n)
                    if got["completion_tokens"] != [tokens] * n:
                        raise RuntimeError(
                            f"{path} at {n}: tokens {got['completion_tokens']}, not {tokens} each"
                        )
                    got["tok_s"] = n * tokens / got["wall_s"]
                    runs.append({"round": r, "n": n, "path": path, **got})
    finally:
        for c in clients:
            c.close()
        local.close()
    ended = {p: rss(pid) for p, pid in pids.items()}
    return {
        "tokens": tokens,
        "concurrency": concurrency,
        "rounds": rounds,
        "n_ctx": n_ctx,
        "in_process_config": {"n_ctx_per_sequence": local.n_ctx_seq, "threads": local.threads},
        "pools": pools_info,
        "runs": runs,
        "summary": {
            f"{n}/{p}": _summary([r for r in runs if r["n"] == n and r["path"] == p])
            for n in concurrency
            for p in paths
        },
        "ratios": {str(n): _ratios(runs, n) for n in concurrency},
        "same_text": _agreement(runs),
        "memory": _memory(settings, gguf, n_ctx, pools, parallel, loaded, ended),
        "machine": {
            **machine.describe(settings.sqlalchemy_url, settings.broker_url),
            "load_avg_start": load_start,
        },
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
    }


def _memory(
    settings: Settings,
    path: Path,
    n_ctx: int,
    pools: dict[str, str],
    parallel: int,
    loaded: dict[str, dict[str, float]],
    ended: dict[str, dict[str, float]],
) -> list[dict[str, Any]]:
    rows = []
    for slots in sorted({1, parallel}):
        est = estimate_for(settings, path, n_ctx, parallel=slots)
        pool = "corral_1" if slots == 1 else "corral_batched"
        rows.append(
            {
                "slots": slots,
                "pool": pool if pool in pools else None,
                "after_load": loaded.get(pool),
                "after_run": ended.get(pool),
                "estimate_mib": {
                    "weights": round(est.weights_bytes / MIB, 1),
                    "kv": round(est.kv_bytes / MIB, 1),
                    "compute": round(est.compute_bytes / MIB, 1),
                    "overhead": round(est.overhead_bytes / MIB, 1),
                    "total": round(est.total_bytes / MIB, 1),
                },
            }
        )
    return rows


# ---- the table -------------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "n/a"}[ok]


def verdicts(result: dict[str, Any]) -> dict[str, bool | None]:
    """The targets at 8 concurrent steps (None: not measured)."""
    if not result["batched_available"] or TARGET_AT not in result["concurrency"]:
        return {"ratio_at_8": None, "last_over_first_at_8": None}
    ratio = result["ratios"][str(TARGET_AT)]
    spread = result["summary"][f"{TARGET_AT}/corral_batched"]["last_over_first"]
    return {
        "ratio_at_8": ratio is not None and ratio >= RATIO_TARGET,
        "last_over_first_at_8": spread <= SPREAD_TARGET,
    }


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"continuous batching, {result['model']}, {result['tokens']}-token chat steps "
        f"(greedy, end of sequence suppressed), batched pool --parallel {result['parallel']}, "
        f"llama.cpp threads {result['in_process_config']['threads']} (one token, a batch), "
        f"medians of {result['rounds']} rounds side by side",
        "",
        "| concurrency | path | tokens/s | p50 ms | p99 ms | first ms | last ms | last/first |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in result["concurrency"]:
        for path in PATHS:
            s = result["summary"].get(f"{n}/{path}")
            if s is None:
                continue
            lines.append(
                f"| {n} | {LABELS[path]} | {s['tok_s']:.1f} | {s['p50_ms']:.1f} "
                f"| {s['p99_ms']:.1f} | {s['first_ms']:.1f} | {s['last_ms']:.1f} "
                f"| {s['last_over_first']:.2f} |"
            )
    lines += [
        "",
        "| concurrency | Corral ÷ in process, tokens/s | ≥ 0.85× | Corral last/first | ≤ 1.5 |",
        "|---|---|---|---|---|",
    ]
    for n in result["concurrency"]:
        ratio = result["ratios"][str(n)]
        s = result["summary"].get(f"{n}/corral_batched")
        if ratio is None or s is None:
            lines.append(f"| {n} | not run | n/a | not run | n/a |")
            continue
        spread = s["last_over_first"]
        lines.append(
            f"| {n} | {ratio:.3f}× | {_verdict(ratio >= RATIO_TARGET)} "
            f"| {spread:.2f} | {_verdict(spread <= SPREAD_TARGET)} |"
        )
    lines += [
        "",
        "| slots | pool RSS after load, MiB | at the end (peak) | scheduler estimate, MiB "
        "(weights + KV + compute + overhead) |",
        "|---|---|---|---|",
    ]
    for row in result["memory"]:
        est = row["estimate_mib"]
        load, end = row["after_load"], row["after_run"]
        at_end = f"{end['rss_mib']} ({end['peak_mib']})" if end else "not run"
        lines.append(
            f"| {row['slots']} | {load['rss_mib'] if load else 'not run'} | {at_end} "
            f"| {est['total']} ({est['weights']} + {est['kv']} + {est['compute']} "
            f"+ {est['overhead']}) |"
        )
    met = result["targets_met"]
    lines += [
        "",
        f"at {TARGET_AT} concurrent steps: Corral ≥ {RATIO_TARGET}× in process: "
        f"{_verdict(met['ratio_at_8'])}; last/first ≤ {SPREAD_TARGET}: "
        f"{_verdict(met['last_over_first_at_8'])}",
    ]
    same = ", ".join(f"{LABELS[p]} {v:.0%}" for p, v in result["same_text"].items())
    lines.append(f"sequences with the in-process text: {same}")
    if not result["batched_available"]:
        lines.append(f"Corral batched not run: {result['batched_reason']}")
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores; load average {m['load_avg_start']} at the "
        f"start, {result['load_avg_end']} at the end"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batching", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", help="catalog name (default smollm2-135m, else tiny-chat)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated")
    parser.add_argument("--tokens", type=int, default=64, help="tokens each step generates")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, side by side")
    parser.add_argument("--parallel", type=int, help="the batched pool's slots (default: max N)")
    parser.add_argument(
        "--threads", type=int, help="llama.cpp threads on every path (default: llama.cpp's)"
    )
    parser.add_argument("--json", type=Path, help="default benchmarks/results/<date>-batching.json")
    args = parser.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if min(concurrency) < 1 or args.tokens < 1 or args.rounds < 1:
        parser.error("--concurrency, --tokens and --rounds must be ≥ 1")
    if args.parallel is not None and args.parallel < max(concurrency):
        parser.error(f"--parallel must be ≥ the largest concurrency {max(concurrency)}")
    result = run(args.model, concurrency, args.tokens, args.rounds, args.parallel, args.threads)
    result["targets_met"] = verdicts(result)
    print(table(result))
    out = args.json or Path(__file__).parent / "results" / f"{date.today()}-batching.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
