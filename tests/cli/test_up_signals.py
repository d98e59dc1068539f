"""`corral up` stops everything it started on SIGTERM exactly as on Ctrl-C (SIGINT).

The real `corral up --no-demo`, in a subprocess with its own data directory and API port;
the test records its whole process tree (API, the host agent and the pool it preloads, beat,
Flower, the embedded redis-server), signals `corral up` alone (as ``docker stop`` or systemd's
``KillMode=mixed`` do), and checks that it exits in bounded time having stopped and reaped
every one of them: nothing may outlive it, so the kernel's parent-death signal (the net
for a `corral up` killed with SIGKILL) cannot hide a shutdown that left something behind.
Once while it serves, once while it is still starting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from app.core.embedded import free_port
from models.catalog import load_catalog

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc"),
]

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0
# Children get 20 s between SIGTERM and SIGKILL (app.cli.up.STOP_GRACE_S); a clean stop of
# the tiny platform takes a few seconds.
EXIT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks after boot: tells a process from a later one with its pid
    cmdline: str


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of ``pid``, None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # fields 3.. of proc(5)
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def descendants(root: int) -> set[Proc]:
    """Every live process under ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[0] in "ZX":
            continue
        children.setdefault(stat[1], []).append(int(entry.name))
        starts[int(entry.name)] = stat[2]
    found: set[Proc] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.add(Proc(pid, starts[pid], _cmdline(pid)))
        todo.extend(children.get(pid, []))
    return found


def alive(proc: Proc) -> bool:
    stat = _stat(proc.pid)
    return stat is not None and stat[0] not in "ZX" and stat[2] == proc.start


def _restore_sigint() -> None:
    # A shell's background job starts with SIGINT ignored, and keeps it ignored in what it
    # starts; `corral up` rightly leaves an ignored signal ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# What a test saw of the tree, for its fixture to kill should the test fail.
_seen: set[Proc] = set()


@pytest.fixture
def up(tmp_path: Path, models_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """`corral up --no-demo` starting, with its output file and API port; whatever is left
    of it afterwards is killed (a failing run must not leak a platform)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    # tiny-chat preloaded: the host agent starts its pool at once, without a step.
    catalog = yaml.safe_load(load_catalog().path.read_text())  # type: ignore[union-attr]
    for entry in catalog["models"]:
        if entry["name"] == "tiny-chat":
            entry["preload"] = True
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    env.update(
        CORRAL_CATALOG_PATH=str(tmp_path / "catalog.yaml"),
        CORRAL_DATA_DIR=str(tmp_path / "data"),
        CORRAL_MODELS_DIR=str(models_dir),
        CORRAL_API_PORT=str(port),
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    out = tmp_path / "up.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli.main", "up", "--no-demo"],
            env=env,
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_restore_sigint,
        )
    try:
        yield proc, out, port
    finally:
        _seen.update(descendants(proc.pid))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _seen:
            if alive(p):
                with suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        _seen.clear()


def _wait_for(
    what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], out: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"corral up exited ({proc.returncode}) before {what}:\n{out.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {START_TIMEOUT_S:.0f} s:\n{out.read_text()}")
        time.sleep(0.1)


def _serving(out: Path, port: int) -> bool:
    if "running;" not in out.read_text(errors="replace"):
        return False
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("phase", ["serving", "starting"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_up_stops_everything_it_started(
    up: tuple[subprocess.Popen[bytes], Path, int],
    tmp_path: Path,
    signum: signal.Signals,
    phase: str,
) -> None:
    proc, out, port = up
    if phase == "serving":
        _wait_for("/healthz answering", lambda: _serving(out, port), proc, out)
        _wait_for(
            "the agent's preloaded pool",
            lambda: any("worker --model tiny-chat" in p.cmdline for p in descendants(proc.pid)),
            proc,
            out,
        )
    else:  # the API process started, the workers starting: far from ready
        api_log = tmp_path / "data" / "logs" / "api.log"
        _wait_for("the API process", api_log.exists, proc, out)
    tree = descendants(proc.pid)
    _seen.update(tree)
    redis = [p for p in tree if "redis-server" in p.cmdline]
    assert redis, f"no embedded redis-server under corral up: {tree}"
    if phase == "serving":
        started = {"app.cli.main api", "app.cli.main agent", "worker --model tiny-chat"}
        started |= {"app.cli.main beat", "app.cli.main flower"}
        missing = [s for s in started if not any(s in p.cmdline for p in tree)]
        assert not missing, f"not under corral up: {missing}; tree {tree}"

    os.kill(proc.pid, signum)
    sent = time.monotonic()
    while proc.poll() is None and time.monotonic() - sent < EXIT_TIMEOUT_S:
        tree |= descendants(proc.pid)  # anything started after the signal counts too
        _seen.update(tree)
        time.sleep(0.05)
    took = time.monotonic() - sent
    output = out.read_text(errors="replace")
    assert proc.poll() is not None, (
        f"corral up still running {EXIT_TIMEOUT_S:.0f} s after {signum.name}"
    )
    # At the moment it exits, not a moment later.
    left = sorted((p for p in tree if alive(p)), key=lambda p: p.pid)
    assert not left, (
        f"corral up exited {took:.1f} s after {signum.name} leaving running: "
        + "; ".join(f"{p.pid} {p.cmdline}" for p in left)
        + f"\n{output}"
    )
    expected = 0 if phase == "serving" else 128 + signum
    assert proc.returncode == expected, output
    assert f"stopping ({signum.name}" in output, output
