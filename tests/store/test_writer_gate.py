"""The SQLite writer gate: one writer at a time across processes, and none kept waiting.

Another process's writer is played by a second open file description of the gate's lock
file (``flock`` locks belong to open files, so two of them conflict even in one process),
and by real processes in the counting test.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.errors import ServiceUnavailable
from app.store.db import _WriterGate


class OtherWriter:
    """The lock as another process holds it: its own open file description."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def lock(self, *, block: bool = True) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "corral.db-writers.lock"


@pytest.fixture
def other(lock_path: Path) -> Iterator[OtherWriter]:
    writer = OtherWriter(lock_path)
    yield writer
    writer.close()


def enter_in_thread(gate: _WriterGate) -> tuple[threading.Thread, threading.Event, list[str]]:
    """Start a thread that holds the gate briefly; (thread, entered, what happened)."""
    entered = threading.Event()
    outcome: list[str] = []

    def run() -> None:
        try:
            with gate.hold():
                entered.set()
            outcome.append("held")
        except ServiceUnavailable as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, entered, outcome


def released_within(other: OtherWriter, seconds: float) -> bool:
    """True once ``other`` can take the lock (then it holds it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if other.lock(block=False):
            return True
        time.sleep(0.01)
    return False


def test_a_waiting_writer_enters_when_the_holder_lets_go(
    lock_path: Path, other: OtherWriter
) -> None:
    gate = _WriterGate(str(lock_path), timeout_s=30)
    assert other.lock()
    thread, entered, outcome = enter_in_thread(gate)
    assert not entered.wait(0.3), "entered while another process held the lock"
    other.unlock()
    assert entered.wait(5), "not handed the lock after the holder let go"
    thread.join(5)
    assert outcome == ["held"]
    assert other.lock(block=False), "the gate kept the lock after its writer left"
    other.unlock()


def test_an_uncontended_writer_takes_the_file_lock_and_gives_it_back(
    lock_path: Path, other: OtherWriter
) -> None:
    gate = _WriterGate(str(lock_path))
    with gate.hold():
        assert not other.lock(block=False), "a writer inside the gate must hold the file lock"
        with gate.hold():  # nested in the same thread: already held
            pass
        assert not other.lock(block=False)
    assert other.lock(block=False)
    other.unlock()


def test_a_writer_gives_up_at_its_timeout_and_the_lock_is_not_kept(
    lock_path: Path, other: OtherWriter
) -> None:
    gate = _WriterGate(str(lock_path), timeout_s=0.3)
    assert other.lock()
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"stayed locked for 0\.3 s"), gate.hold():
        pytest.fail("entered while another process held the lock")
    assert time.monotonic() - started >= 0.3
    other.unlock()
    time.sleep(0.3)  # a given-up writer that still took the lock would hold it by now
    assert released_within(other, 5), "a given-up wait kept the lock"
    other.unlock()
    with gate.hold():  # and the gate works afterwards
        assert not other.lock(block=False)
    assert other.lock(block=False)
    other.unlock()


COUNTER = """
import sys, time
from pathlib import Path
from app.store.db import _WriterGate
gate = _WriterGate(sys.argv[1])
counter = Path(sys.argv[2])
for _ in range(int(sys.argv[3])):
    with gate.hold():
        value = int(counter.read_text())
        time.sleep(0.0005)  # a transaction's worth, so the writers overlap
        counter.write_text(str(value + 1))
"""


def test_writers_in_separate_processes_never_overlap(lock_path: Path, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    n, procs = 150, 3
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", COUNTER, str(lock_path), str(counter), str(n)], env=env
        )
        for _ in range(procs)
    ]
    for child in children:
        assert child.wait(120) == 0
    # A read-modify-write outside the lock would lose increments.
    assert int(counter.read_text()) == n * procs
