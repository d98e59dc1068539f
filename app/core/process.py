"""Set-up shared by Corral's long-running processes (the API, model worker pools).

A long-running process holds some 180,000 objects from its imports and start-up (modules,
FastAPI's routes and models, SQLAlchemy's metadata, Celery's app) that live until it
exits. CPython's cyclic garbage collector walks every one of them at each full
collection, during which the process serves nothing. :func:`freeze_startup_objects`
moves them to the collector's permanent generation once start-up is done, so a full
collection walks only what came after.

And the supervision of child processes (``corral up``): :class:`ShutdownSignals` turns
SIGTERM and SIGHUP into the KeyboardInterrupt a Ctrl-C raises, so every way of asking a
supervisor to stop takes one shutdown path; :func:`stop_children` stops children that lead
their own process groups (SIGTERM, a grace period, then SIGKILL to what is left of each
group); :func:`parent_death_signal` has the kernel signal a child whose supervisor died
without a word (SIGKILL, a crash).
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from types import FrameType, TracebackType
from typing import Any


def freeze_startup_objects() -> int:
    """Collect once, then freeze every object alive now; returns how many are frozen.

    The collection first: what is frozen is never collected, so start-up's garbage must
    not be among it. Call it when start-up is done (after a model worker has loaded its
    model), and in a parent just before it forks (its children then share those pages
    instead of copying them when the collector would have touched them).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


SHUTDOWN_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """A shutdown signal raised in the main thread; a KeyboardInterrupt, so a SIGTERM takes
    exactly the path a Ctrl-C takes."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


_active: ShutdownSignals | None = None


class ShutdownSignals:
    """SIGINT, SIGTERM and SIGHUP, while installed (main thread only), raise :class:`Terminated`
    (a signal this process was started ignoring stays ignored).

    The first signal raises; from then on (and once :meth:`stopping` is called) further
    signals raise nothing and only make :attr:`hurried` true: a supervisor's clean-up must
    not itself be interrupted, but a second Ctrl-C may cut its grace period short. Inside
    :meth:`held` (the few statements that start a child and record it) a signal waits
    until the block ends, so no child is ever started without being recorded::

        with ShutdownSignals() as signals:
            try:
                with signals.held():
                    child = subprocess.Popen(...)
                    children.append(child)
                ...
            finally:
                try:
                    signals.stopping()
                finally:
                    stop_children(children, grace_s=20, hurried=lambda: signals.hurried)
    """

    def __init__(self, signums: Iterable[int] = SHUTDOWN_SIGNALS) -> None:
        self.signums = tuple(signums)
        self.received: list[int] = []
        self._pending: int | None = None
        self._held = 0
        self._stopping_at: int | None = None
        self._previous: dict[int, Any] = {}
        self._outer: ShutdownSignals | None = None

    def __enter__(self) -> ShutdownSignals:
        global _active
        for signum in self.signums:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # as nohup, or a shell's background job, asked
            self._previous[signum] = signal.signal(signum, self._handle)
        self._outer, _active = _active, self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _active
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        _active = self._outer

    @property
    def first(self) -> int | None:
        """The signal that started the shutdown, if one did."""
        return self.received[0] if self.received else None

    @property
    def hurried(self) -> bool:
        """A signal came after the shutdown began: stop waiting for children, kill them."""
        return self._stopping_at is not None and len(self.received) > self._stopping_at

    def stopping(self) -> None:
        """The shutdown has begun: signals from now on only hurry it."""
        if self._stopping_at is None:
            self._stopping_at = len(self.received)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Signals that come inside the block are raised when it ends."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self._pending is not None and self._stopping_at is None:
            signum, self._pending = self._pending, None
            self._stopping_at = len(self.received)
            raise Terminated(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self._stopping_at is not None:
            return
        if self._held:
            self._pending = self._pending or signum
            return
        self._stopping_at = len(self.received)
        raise Terminated(signum)


def signals_held() -> AbstractContextManager[None]:
    """:meth:`ShutdownSignals.held` of the installed handler, else nothing."""
    return _active.held() if _active is not None else nullcontext()


def _running(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has not exited, without reaping it (its pid, and so its process
    group's id, stays reserved until :meth:`~subprocess.Popen.wait`)."""
    if proc.returncode is not None:
        return False
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return proc.poll() is None


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stop_children(
    procs: Sequence[subprocess.Popen[bytes]],
    *,
    grace_s: float,
    hurried: Callable[[], bool] = lambda: False,
) -> None:
    """Stop and reap children that each lead their own process group
    (``start_new_session=True``).

    Each child gets SIGTERM (the child alone: it stops its own children, as a Celery worker
    stops its pool); after ``grace_s`` seconds, or as soon as ``hurried()``, whatever is
    left of each child's process group gets SIGKILL, so no grandchild outlives it either.
    """
    for proc in procs:
        if _running(proc):
            # os.kill, not Popen.send_signal: that reaps a child that has just exited.
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_running(p) for p in procs) and time.monotonic() < deadline and not hurried():
        time.sleep(0.05)
    for proc in procs:
        # Unreaped, a child's pid cannot be reused, so the group is still its own (reaped
        # earlier, its group id stays taken while any member lives: the ones to kill).
        _kill_group(proc.pid)
        proc.wait()


_PR_SET_PDEATHSIG = 1


def _prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def parent_death_signal(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``signum`` to the child when this process
    dies, however it dies (Linux's ``PR_SET_PDEATHSIG``); None where there is no such thing.

    Call it in the thread that starts the child, and let that thread live as long as the
    child should (the kernel watches the thread).
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    args = (
        ctypes.c_int(_PR_SET_PDEATHSIG),
        ctypes.c_ulong(signum),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )

    def preexec() -> None:
        prctl(*args)
        if os.getppid() != parent:  # the parent died before the kernel was told
            os.kill(os.getpid(), signum)

    return preexec
