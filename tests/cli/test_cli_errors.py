"""A command that meets a configuration or service problem says so in one line.

The real `corral` console script, in a subprocess with a clean environment: an unreachable
database or Redis, no Redis URL, a missing model file, an invalid ``CORRAL_*`` setting, a
database without tables. Each must exit non-zero with exactly one line on stderr that says
what is wrong and what to do, and no traceback anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.main import describe_error
from app.core.embedded import free_port

CORRAL = Path(sys.executable).with_name("corral")  # the console script of this environment


def corral(
    *args: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    assert CORRAL.is_file(), f"{CORRAL} is missing: install the project (pip install -e .)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    clean["CORRAL_DATA_DIR"] = str(cwd / "data")
    clean.update(env or {})
    return subprocess.run(
        [str(CORRAL), *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_error_line(proc: subprocess.CompletedProcess[str], *phrases: str, code: int = 2) -> str:
    """The single ``error:`` line on stderr, checked for ``phrases``, the exit code and the
    absence of a traceback."""
    out = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, out
    assert proc.returncode == code, out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, out
    line = lines[0]
    assert line.startswith("error: "), out
    for phrase in phrases:
        assert phrase in line, f"{phrase!r} not in {line!r}"
    return line


def closed_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_status_with_an_unreachable_database(tmp_path: Path, redis_base_url: str) -> None:
    url = f"postgresql://corral:s3cret@127.0.0.1:{free_port()}/corral"
    proc = corral(
        "status", cwd=tmp_path, env={"CORRAL_DATABASE_URL": url, "CORRAL_REDIS_URL": redis_base_url}
    )
    one_error_line(
        proc, "the database is unavailable", "Connection refused", "check CORRAL_DATABASE_URL"
    )
    assert "redis     ok" in proc.stdout and "database  unavailable" in proc.stdout
    assert "s3cret" not in proc.stdout + proc.stderr


def test_status_with_redis_on_a_closed_port(tmp_path: Path) -> None:
    proc = corral("status", cwd=tmp_path, env={"CORRAL_REDIS_URL": closed_redis()})
    one_error_line(proc, "Redis is unavailable", "point CORRAL_REDIS_URL at a running Redis")
    assert "redis     unavailable" in proc.stdout and "database  ok" in proc.stdout


def test_status_without_a_redis_url(tmp_path: Path) -> None:
    proc = corral("status", cwd=tmp_path)
    one_error_line(proc, "CORRAL_REDIS_URL is not set", "corral up")


def test_gpus_with_redis_on_a_closed_port(tmp_path: Path) -> None:
    url = closed_redis()
    proc = corral("gpus", cwd=tmp_path, env={"CORRAL_REDIS_URL": url})
    one_error_line(proc, f"Redis at {url} is unavailable", "CORRAL_REDIS_URL")


def test_gpus_with_a_malformed_redis_url(tmp_path: Path) -> None:
    proc = corral("gpus", cwd=tmp_path, env={"CORRAL_REDIS_URL": "localhost:6379"})
    one_error_line(proc, "CORRAL_REDIS_URL='localhost:6379' is not a Redis URL", "redis://")


def test_worker_with_a_missing_model_file(tmp_path: Path, redis_base_url: str) -> None:
    proc = corral(
        "worker",
        "--model",
        "tiny-chat",
        cwd=tmp_path,
        env={"CORRAL_REDIS_URL": redis_base_url, "CORRAL_MODELS_DIR": str(tmp_path)},
    )
    one_error_line(proc, f"{tmp_path / 'tiny-chat.gguf'}: no such file", "make-tiny")


def test_worker_with_redis_on_a_closed_port(tmp_path: Path, models_dir: Path) -> None:
    """The model is fine; the broker is not there: said at once, not retried by Celery."""
    proc = corral(
        "worker",
        "--model",
        "tiny-chat",
        "--gpu",
        "none",
        cwd=tmp_path,
        timeout=60,
        env={"CORRAL_REDIS_URL": closed_redis(), "CORRAL_MODELS_DIR": str(models_dir)},
    )
    one_error_line(proc, "Redis is unavailable", "CORRAL_REDIS_URL")


@pytest.mark.parametrize(
    ("variable", "value", "phrase"),
    [
        ("CORRAL_API_PORT", "eighty", "CORRAL_API_PORT='eighty': Input should be a valid integer"),
        ("CORRAL_LOG_LEVEL", "chatty", "CORRAL_LOG_LEVEL='chatty': Input should be 'DEBUG'"),
        ("CORRAL_MEMORY_EMBED_BATCH", "0", "CORRAL_MEMORY_EMBED_BATCH='0'"),
    ],
)
def test_an_invalid_setting(tmp_path: Path, variable: str, value: str, phrase: str) -> None:
    proc = corral("models", "list", cwd=tmp_path, env={variable: value})
    one_error_line(proc, "invalid setting", phrase, "fix or unset it")


def test_keys_on_a_database_without_tables(tmp_path: Path) -> None:
    proc = corral("keys", "list", cwd=tmp_path)
    one_error_line(proc, "has no Corral tables yet", "run `corral db upgrade`")


def test_keys_on_an_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql://corral:s3cret@127.0.0.1:{free_port()}/corral"
    proc = corral("keys", "create", "ci", cwd=tmp_path, env={"CORRAL_DATABASE_URL": url})
    line = one_error_line(proc, "is unavailable", "check CORRAL_DATABASE_URL")
    assert "s3cret" not in line and "corral:***@127.0.0.1" in line


def test_db_upgrade_with_a_malformed_database_url(tmp_path: Path) -> None:
    proc = corral("db", "upgrade", cwd=tmp_path, env={"CORRAL_DATABASE_URL": "not a url"})
    one_error_line(proc, "CORRAL_DATABASE_URL is not a usable database URL", "postgresql://")


def test_submit_with_a_malformed_api_url(tmp_path: Path) -> None:
    spec = tmp_path / "wf.json"
    spec.write_text("{}")
    proc = corral(
        "submit",
        str(spec),
        cwd=tmp_path,
        env={"CORRAL_API_URL": "http://[::1", "CORRAL_API_KEY": "crl_x_y"},
    )
    one_error_line(proc, "the API URL (--api-url / CORRAL_API_URL) is not valid")


def test_submit_with_the_api_down(tmp_path: Path) -> None:
    spec = tmp_path / "wf.json"
    spec.write_text("{}")
    url = f"http://127.0.0.1:{free_port()}"
    proc = corral(
        "submit", str(spec), cwd=tmp_path, env={"CORRAL_API_URL": url, "CORRAL_API_KEY": "crl_x_y"}
    )
    one_error_line(proc, f"cannot reach the API at {url}/v1/workflows", "corral api")


@pytest.mark.parametrize(
    "exc", [RuntimeError("a bug"), KeyError("x"), ValueError("not about Redis")]
)
def test_anything_else_is_not_described(exc: Exception) -> None:
    """Only known problems become one line: anything else is a bug, worth its traceback."""
    assert describe_error(exc) is None


def test_a_wrapped_service_error_is_described_by_its_cause() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from app.core.errors import ServiceUnavailable

    try:
        try:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1.")
        except RedisConnectionError as cause:
            raise ServiceUnavailable(f"Redis is unavailable: {cause}") from cause
    except ServiceUnavailable as exc:
        described = describe_error(exc)
    assert described is not None
    message, code = described
    assert code == 2 and "Error 111" in message and "CORRAL_REDIS_URL" in message
