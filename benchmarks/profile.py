"""Where a workflow's CPU goes, by process and by layer: py-spy under figure 2's load.

::

    python -m benchmarks.profile [--seconds 20] [--json out.json] [--raw-dir DIR]

Starts the benchmark stack, then submits batches of one-step workflows over HTTP (figure 2's
load: 8 client threads) while ``py-spy record --gil`` samples the API process, the worker's
main process (Celery's consumer) and its pool processes. Only samples in which a thread
holds the GIL count: Python's own work, which is where Corral's overhead lives. llama.cpp's
decode, SQLite's and PostgreSQL's C code and socket I/O release the GIL, so they show in
the measured CPU column (``/proc``) and not in the layers.

Each sample goes to the layer of its innermost frame that belongs to one (a ``json.dumps``
called from Corral's dispatch is Corral's; an ``asyncio`` frame under uvicorn is HTTP's).
The table gives milliseconds per workflow. ``--raw-dir`` keeps py-spy's raw stacks (one
file per process, ``flamegraph.pl`` input) for a closer look. Needs ``py-spy`` (in the dev
extra) and permission to ptrace the stack's processes (root, or ``ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from app.core.config import PACKAGE_ROOT
from benchmarks.stats import children_of, cpu_s

# (layer, the starts of the paths of its files: a package's, relative to site-packages or
# the standard library, or a file's in this repository); the first match wins per frame.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("llama.cpp runtime", ("llama_cpp/", "workers/runtime.py")),
    ("database", ("sqlalchemy/", "sqlmodel/", "psycopg", "sqlite3/", "app/store/")),
    ("redis client", ("redis/",)),
    ("celery, kombu, billiard", ("celery/", "kombu/", "billiard/", "vine/")),
    ("http: uvicorn, starlette, fastapi", ("uvicorn/", "starlette/", "fastapi/", "anyio/")),
    ("validation, templates", (
        "pydantic", "jinja2/", "app/workflows/spec.py", "app/workflows/templating.py",
    )),
    ("corral", ("app/", "workers/", "models/")),
)  # fmt: skip
OTHER = "python, other"
GROUPS = ("api", "consumer", "pool")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")
_LIB = re.compile(r".*/(site-packages|dist-packages|lib/python3\.\d+)/")


def _relative(path: str) -> str:
    """A frame's file as py-spy shortens it: relative to site-packages or the repository."""
    path = _LIB.sub("", path)
    root = str(PACKAGE_ROOT) + "/"
    return path[len(root) :] if path.startswith(root) else path


def layer_of(frames: list[str]) -> str:
    """The layer of a sample: that of its innermost frame that belongs to one."""
    for frame in reversed(frames):
        m = _FRAME.match(frame)
        path = _relative(m["file"] if m else frame)
        for layer, starts in LAYERS:
            if path.startswith(starts):
                return layer
    return OTHER


def parse_raw(text: str) -> Iterator[tuple[list[str], int]]:
    """py-spy's raw format: ``frame;frame;... count`` per line, outermost frame first."""
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    return f"{m['func']} ({_relative(m['file'])})"


@dataclass
class GroupProfile:
    """The samples of one group of processes."""

    samples: int = 0
    layers: Counter[str] = field(default_factory=Counter)
    leaves: Counter[str] = field(default_factory=Counter)
    cpu_s: float = 0.0

    def add(self, text: str) -> None:
        for frames, count in parse_raw(text):
            # A thread's own frames only (py-spy may prefix "process"/"thread" pseudo-frames).
            frames = [f for f in frames if _FRAME.match(f)]
            if not frames:
                continue
            self.samples += count
            self.layers[layer_of(frames)] += count
            self.leaves[_short(frames[-1])] += count


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).is_file():
        raise SystemExit("py-spy not found: pip install py-spy (it is in Corral's dev extra)")
    return found


def _spy(exe: str, pid: int, rate: int, out: Path) -> subprocess.Popen[bytes]:
    cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--gil", "--nonblocking"]
    cmd += ["--format", "raw", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
    for spy in spies:
        try:
            _, err = spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            raise RuntimeError("py-spy did not stop within 30 s") from None
        if spy.returncode not in (0, -signal.SIGINT):
            raise RuntimeError(f"py-spy exited with {spy.returncode}: {err.decode()[-2000:]}")


def profile(
    seconds: float, rate: int, batch: int, concurrency: int, raw_dir: Path
) -> dict[str, Any]:
    """Run the load under py-spy; the per-group, per-layer result."""
    from benchmarks import overhead
    from benchmarks.stack import start_stack
    from benchmarks.work import GenCall

    exe = _py_spy()
    call = GenCall(max_tokens=16)
    stack = start_stack(workers=2, log_level="WARNING")
    try:
        overhead.corral_batch(stack, call, batch, concurrency)  # warm: caches, connections
        (api,) = stack.pids("api")
        (consumer,) = stack.pids("worker")
        pids = {"api": [api], "consumer": [consumer], "pool": children_of(consumer)}
        if not pids["pool"]:
            raise RuntimeError("the worker has no pool processes")
        outputs = {g: [raw_dir / f"{g}-{p}.txt" for p in ps] for g, ps in pids.items()}
        spies = [
            _spy(exe, p, rate, out)
            for g, ps in pids.items()
            for p, out in zip(ps, outputs[g], strict=True)
        ]
        time.sleep(1.0)  # py-spy attached before the load starts
        if any(spy.poll() is not None for spy in spies):
            _stop(spies)
            raise RuntimeError("py-spy exited at once")
        cpu0 = {g: sum(cpu_s(p) or 0.0 for p in ps) for g, ps in pids.items()}
        started, workflows = time.monotonic(), 0
        while time.monotonic() - started < seconds:
            overhead.corral_batch(stack, call, batch, concurrency)
            workflows += batch
        elapsed = time.monotonic() - started
        cpu1 = {g: sum(cpu_s(p) or 0.0 for p in ps) for g, ps in pids.items()}
        _stop(spies)
    finally:
        stack.stop()
    groups: dict[str, GroupProfile] = {}
    for g in GROUPS:
        groups[g] = prof = GroupProfile(cpu_s=cpu1[g] - cpu0[g])
        for out in outputs[g]:
            prof.add(out.read_text() if out.is_file() else "")
    return _result(groups, workflows, elapsed, rate, pids)


def _result(
    groups: dict[str, GroupProfile],
    workflows: int,
    elapsed: float,
    rate: int,
    pids: dict[str, list[int]],
) -> dict[str, Any]:
    def ms(samples: int) -> float:
        return round(samples / rate * 1000 / workflows, 3)

    layers = [layer for layer, _ in LAYERS] + [OTHER]
    all_leaves: Counter[str] = Counter()
    for prof in groups.values():
        all_leaves.update(prof.leaves)
    return {
        "workflows": workflows,
        "seconds": round(elapsed, 2),
        "workflows_per_s": round(workflows / elapsed, 1),
        "rate_hz": rate,
        "processes": {g: len(p) for g, p in pids.items()},
        "gil_ms_per_workflow": {
            g: {layer: ms(groups[g].layers[layer]) for layer in layers} for g in GROUPS
        },
        "gil_total_ms_per_workflow": {g: ms(groups[g].samples) for g in GROUPS},
        "cpu_ms_per_workflow": {g: round(groups[g].cpu_s * 1000 / workflows, 3) for g in GROUPS},
        "top_functions_ms_per_workflow": [[name, ms(n)] for name, n in all_leaves.most_common(15)],
    }


def render(result: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"CPU per workflow, ms ({result['workflows']} one-step workflows, "
        f"{result['workflows_per_s']}/s; py-spy --gil at {result['rate_hz']} Hz)"
    )
    table.add_column("layer (Python holding the GIL)")
    for g in GROUPS:
        table.add_column(f"{g} ({result['processes'][g]})", justify="right")
    table.add_column("all", justify="right")
    gil = result["gil_ms_per_workflow"]
    for layer in gil["api"]:
        values = [gil[g][layer] for g in GROUPS]
        table.add_row(layer, *(f"{v:.3f}" for v in values), f"{sum(values):.3f}")
    totals = [result["gil_total_ms_per_workflow"][g] for g in GROUPS]
    table.add_row("GIL held, total", *(f"{v:.3f}" for v in totals), f"{sum(totals):.3f}")
    cpu = [result["cpu_ms_per_workflow"][g] for g in GROUPS]
    table.add_row("measured CPU (/proc)", *(f"{v:.3f}" for v in cpu), f"{sum(cpu):.3f}")
    console.print(table)
    top = Table(title="innermost functions, ms per workflow, all processes")
    top.add_column("function")
    top.add_column("ms", justify="right")
    for name, value in result["top_functions_ms_per_workflow"]:
        top.add_row(name, f"{value:.3f}")
    console.print(top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("--seconds", type=float, default=20.0, help="how long the load runs")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--batch", type=int, default=200, help="workflows per batch")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--raw-dir", type=Path, help="keep py-spy's raw stacks here")
    args = p.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=170)
    with tempfile.TemporaryDirectory(prefix="corral-profile-") as tmp:
        raw_dir = args.raw_dir or Path(tmp)
        raw_dir.mkdir(parents=True, exist_ok=True)
        console.print("starting the benchmark stack; profiling under load …")
        result = profile(args.seconds, args.rate, args.batch, args.concurrency, raw_dir)
    render(result, console)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
