"""How much slower a process answers after it has gone idle, on this machine.

Figure 1 runs one step at a time, so each process on a step's path sleeps before its turn.
On some virtual machines waking a sleeping process costs far more than the work it then
does; this measures that floor, outside Corral::

    python -m benchmarks.wakeup [--n 300] [--gaps 0,2,20]

It starts a redis-server and a minimal FastAPI app on uvicorn (the API's stack: uvloop and
httptools when installed), then times a Redis ``PING`` and an HTTP ``GET`` from one client,
back to back and after each idle gap (milliseconds), and prints the medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from rich.console import Console
from rich.table import Table

from app.core.embedded import EmbeddedRedis, free_port
from benchmarks.client import KINDS, BenchClient, ClientKind, open_client

_APP = """
from fastapi import FastAPI

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}
"""


def _median_us(call: Callable[[], object], n: int, gap_s: float) -> float:
    times: list[float] = []
    for _ in range(n + n // 10):  # the first tenth warms up
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times[n // 10 :])


def _wait_http(client: BenchClient, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.get("/ping").raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def measure(
    n: int, gaps_ms: list[float], http_client: ClientKind = "stdlib"
) -> dict[str, dict[float, float]]:
    """Median microseconds per call, by target and idle gap."""
    out: dict[str, dict[float, float]] = {"redis PING": {}, "HTTP GET (FastAPI)": {}}
    with tempfile.TemporaryDirectory(prefix="corral-wakeup-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", persist=False).start()
        app_dir = Path(tmp) / "app"
        app_dir.mkdir()
        (app_dir / "wakeup_app.py").write_text(_APP)
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "wakeup_app:app", "--port", str(port)]
        api = subprocess.Popen([*command, "--log-level", "warning", "--no-access-log"], cwd=app_dir)
        try:
            client = redis.Redis.from_url(server.url)
            with open_client(http_client, f"http://127.0.0.1:{port}") as http:
                _wait_http(http)
                for gap in gaps_ms:
                    out["redis PING"][gap] = _median_us(client.ping, n, gap / 1000)
                    out["HTTP GET (FastAPI)"][gap] = _median_us(
                        lambda: http.get("/ping").raise_for_status(), n, gap / 1000
                    )
            client.close()
        finally:
            api.terminate()
            api.wait(10)
            server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="calls per cell (after a warm-up)")
    p.add_argument("--gaps", default="0,2,20", help="idle gaps before each call, ms")
    p.add_argument("--http-client", choices=KINDS, default="stdlib", help="as benchmarks.run's")
    args = p.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]
    result = measure(args.n, gaps, args.http_client)
    table = Table(title=f"median µs per call after an idle gap (n={args.n})")
    table.add_column("call")
    for gap in gaps:
        table.add_column("back to back" if gap == 0 else f"after {gap:g} ms idle")
    for name, by_gap in result.items():
        table.add_row(name, *(f"{by_gap[g]:.0f}" for g in gaps))
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
