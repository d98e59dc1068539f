"""The benchmarks' HTTP client: keep-alive HTTP/1.1 on the standard library's http.client.

The figures measure what Corral costs, so the client that drives them should cost as little
as a client can: httpx spends about 0.35 ms more CPU per request than ``http.client`` on the
same connection (measured on the benchmark's hosts), and on a 2-vCPU machine that CPU is
taken from the API and the workers. ``--http-client httpx`` runs the figures with httpx
instead, to see the client's own share.

One :class:`Client` holds one connection and serves one thread at a time, as an
``httpx.Client`` used by one thread does; it speaks the part of httpx's interface the
benchmarks use (``get``, ``post``, ``json()``, ``raise_for_status()``).
"""

from __future__ import annotations

import http.client
import json as jsonlib
import socket
import time
from types import TracebackType
from typing import Any, Literal, Protocol, Self
from urllib.parse import urlencode, urlsplit

import httpx

ClientKind = Literal["stdlib", "httpx"]
KINDS: tuple[ClientKind, ...] = ("stdlib", "httpx")

# uvicorn closes a keep-alive connection after 5 s idle; one idle this long is reopened
# before it is used, so a request never meets a connection the server is closing.
_IDLE_REOPEN_S = 2.0


class HTTPError(httpx.HTTPError):
    """A request failed: the connection, or a status that is not a success (an
    ``httpx.HTTPError``, so one ``except`` serves both kinds of client)."""


class Response:
    """Status, headers and body of one answer."""

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    def raise_for_status(self) -> Response:
        if not self.is_success:
            raise HTTPError(f"HTTP {self.status_code}: {self.text[:500]}")
        return self


class BenchClient(Protocol):
    """What the figures need of a client (``httpx.Client`` has it too)."""

    def get(self, url: str, *, params: dict[str, Any] | None = None) -> Any: ...

    def post(self, url: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...


class Client:
    """One keep-alive connection to ``base_url`` (``http://host:port``), for one thread."""

    def __init__(
        self, base_url: str, headers: dict[str, str] | None = None, timeout: float = 120.0
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"base_url must be http://host[:port], got {base_url!r}")
        self._host, self._port = parts.hostname, parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Host": parts.netloc, "Accept": "application/json", **(headers or {})}
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._used = 0.0

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is not None and time.monotonic() - self._used > _IDLE_REOPEN_S:
            self.close()
        if self._conn is None:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            conn.connect()
            assert conn.sock is not None
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        return self._conn

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Response:
        target = self._prefix + url + (f"?{urlencode(params)}" if params else "")
        headers = dict(self._headers)
        body = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        headers["Content-Length"] = str(len(body) if body is not None else 0)
        try:
            conn = self._connection()
            conn.request(method, target, body=body, headers=headers)
            answer = conn.getresponse()
            content = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise HTTPError(f"{method} {target}: {exc!r}") from exc
        self._used = time.monotonic()
        if answer.will_close:
            self.close()
        return Response(answer.status, dict(answer.getheaders()), content)

    def get(self, url: str, *, params: dict[str, Any] | None = None) -> Response:
        return self.request("GET", url, params=params)

    def post(self, url: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Response:
        return self.request("POST", url, json=json, params=params)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()


def open_client(
    kind: ClientKind, base_url: str, headers: dict[str, str] | None = None, timeout: float = 120.0
) -> BenchClient:
    """A client of ``kind`` for ``base_url``."""
    if kind == "httpx":
        return httpx.Client(base_url=base_url, headers=headers, timeout=timeout)
    return Client(base_url, headers, timeout)
