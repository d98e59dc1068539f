"""The API keeps an idle connection open longer than clients keep theirs (httpx and the
OpenAI SDK drop theirs after 5 s): a client that reuses a connection idle for 6 s is
answered, never met by a connection the server has just closed."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import pytest

from tests.utils.platform import Platform

pytestmark = pytest.mark.e2e

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: corral\r\nConnection: keep-alive\r\n\r\n"


def exchange(sock: socket.socket) -> bytes:
    sock.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data  # closed by the server
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_an_idle_keep_alive_connection_is_still_served_after_six_seconds(
    platform: Platform,
) -> None:
    where = urlsplit(platform.url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        assert exchange(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)  # past httpx's and uvicorn's default 5 s
        assert exchange(sock).startswith(b"HTTP/1.1 200")
