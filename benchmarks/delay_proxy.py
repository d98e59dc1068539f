"""A TCP proxy that delays every chunk by a fixed time each way: a database "on another host".

On one machine a round trip to PostgreSQL costs two process wake-ups; on a network it
costs the network's round-trip time as well (a few hundred microseconds within a data
centre). ``python -m benchmarks.engine_cost --database URL --rtt-ms 0.5`` puts this proxy
in front of the database so that each round trip costs about that much more, and the
figure shows what the engine's number of round trips costs where the database is remote.

Each connection gets two threads, one per direction: a chunk read is forwarded once
``delay`` has passed since it was read (chunks keep their order). The delay is a sleep,
so it is as precise as the host's timers (tens of microseconds).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


class DelayProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``(host, port)`` with a delay."""

    def __init__(self, host: str, port: int, one_way_s: float) -> None:
        self.target = (host, port)
        self.one_way_s = one_way_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []

    def start(self) -> DelayProxy:
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(s)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                chunk = src.recv(1 << 16)
                due = time.perf_counter() + self.one_way_s
                if not chunk:
                    break
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(chunk)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def delayed(url: str, rtt_ms: float) -> Iterator[str]:
    """``url`` (a PostgreSQL URL with host and port) through a proxy adding ``rtt_ms``."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    proxy = DelayProxy(parsed.host or "127.0.0.1", parsed.port or 5432, rtt_ms / 2000).start()
    try:
        yield parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    finally:
        proxy.close()
