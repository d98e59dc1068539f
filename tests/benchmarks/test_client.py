"""The benchmarks' keep-alive client (benchmarks/client.py) against a real HTTP/1.1 server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest

from benchmarks import client as bench_client
from benchmarks.client import Client, HTTPError, open_client


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless a response says otherwise
    # The client ends (host, port) of the connections that carried requests: a new
    # connection has a new port (a socket object's id may be reused once it is closed).
    connections: ClassVar[set[tuple[str, int]]] = set()
    closes_after: int | None = None  # answer "Connection: close" to this request number
    served = 0

    def _answer(self, status: int, payload: Any, *, close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> bool:
        cls = type(self)
        cls.connections.add(self.client_address)
        cls.served += 1
        return cls.closes_after is not None and cls.served == cls.closes_after

    def do_GET(self) -> None:
        close = self._record()
        if self.path.startswith("/missing"):
            self._answer(404, {"detail": "no such thing"}, close=close)
            return
        auth = self.headers.get("Authorization")
        self._answer(200, {"path": self.path, "auth": auth}, close=close)

    def do_POST(self) -> None:
        close = self._record()
        length = int(self.headers["Content-Length"])
        sent = json.loads(self.rfile.read(length))
        self._answer(
            202,
            {"path": self.path, "echo": sent, "type": self.headers.get("Content-Type")},
            close=close,
        )

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.connections = set()
    _Handler.closes_after = None
    _Handler.served = 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_get_and_post_on_one_kept_alive_connection(server: str) -> None:
    with Client(server, {"Authorization": "Bearer k"}) as client:
        got = client.get("/v1/things", params={"status": "running", "limit": 2})
        assert got.status_code == 200 and got.is_success
        assert got.json() == {"path": "/v1/things?status=running&limit=2", "auth": "Bearer k"}
        posted = client.post("/v1/things", json={"a": [1, "é"]}, params={"wait_s": 1.5})
        assert posted.status_code == 202
        assert posted.raise_for_status() is posted
        assert posted.json() == {
            "path": "/v1/things?wait_s=1.5",
            "echo": {"a": [1, "é"]},
            "type": "application/json",
        }
        for _ in range(5):
            client.get("/again")
    assert _Handler.served == 7
    assert len(_Handler.connections) == 1  # every request reused the first connection


def test_an_error_status_raises_an_httpx_error_with_the_body(server: str) -> None:
    with Client(server) as client:
        resp = client.get("/missing")
        assert resp.status_code == 404 and not resp.is_success
        with pytest.raises(httpx.HTTPError, match=r"HTTP 404.*no such thing"):
            resp.raise_for_status()


def test_a_closed_connection_is_reopened_for_the_next_request(server: str) -> None:
    _Handler.closes_after = 2  # the server ends the connection with its second answer
    with Client(server) as client:
        assert [client.get(f"/n{i}").status_code for i in range(4)] == [200] * 4
    assert len(_Handler.connections) == 2


def test_an_idle_connection_is_reopened_before_use(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_client, "_IDLE_REOPEN_S", 0.0)  # every gap counts as idle
    with Client(server) as client:
        client.get("/a")
        client.get("/b")
    assert len(_Handler.connections) == 2


def test_connection_refused_is_an_httpx_error() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), _Handler) as httpd:
        port = httpd.server_address[1]  # bound, then closed: nothing listens there
    with Client(f"http://127.0.0.1:{port}") as client, pytest.raises(HTTPError):
        client.get("/")


def test_only_plain_http_base_urls() -> None:
    with pytest.raises(ValueError, match="http://host"):
        Client("https://example.test")


@pytest.mark.parametrize("kind", ["stdlib", "httpx"])
def test_both_kinds_answer_alike(server: str, kind: bench_client.ClientKind) -> None:
    with open_client(kind, server, {"Authorization": "Bearer z"}) as client:
        resp = client.get("/x", params={"q": "1"})
        assert resp.status_code == 200
        assert resp.json() == {"path": "/x?q=1", "auth": "Bearer z"}
        assert client.post("/y", json={"k": 1}).json()["echo"] == {"k": 1}
