"""The ``corral`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from kombu.utils.imports import symbol_by_name
from pydantic import ValidationError
from pydantic_settings import SettingsError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, ProgrammingError

from app.cli import agent_cmd, governance_cmd, memory_cmd, models_cmd
from app.core.config import get_settings
from app.core.errors import CorralError, PlacementError
from app.workflows.names import SYSTEM_QUEUE, WORKER_APP, WORKER_LAUNCH

app = typer.Typer(
    help="Corral: local LLM workflows on per-model worker pools.", no_args_is_help=True
)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
db_app = typer.Typer(help="The database.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.add_typer(models_cmd.app, name="models")
app.add_typer(memory_cmd.app, name="memory")

console = Console()
err = Console(stderr=True, soft_wrap=True)


def _worker_side(name: str) -> Any:
    """An object of the workers package, loaded by name (``module:attribute``) when a
    command starts worker-side processes."""
    return symbol_by_name(name)  # type: ignore[no-untyped-call]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(one_line(message))}")
    return typer.Exit(code)


@app.command()
def up(
    demo: Annotated[
        bool, typer.Option(help="Submit the demo workflow and print its result.")
    ] = True,
    exit_after_demo: Annotated[
        bool, typer.Option(help="Stop everything once the demo workflow has finished.")
    ] = False,
    flower: Annotated[bool, typer.Option(help="Run Flower too.")] = True,
) -> None:
    """Run the whole platform on embedded defaults: Redis, SQLite, API, workers, beat, Flower."""
    from app.cli.up import run_platform

    raise typer.Exit(run_platform(demo=demo, exit_after_demo=exit_after_demo, flower=flower))


KEEP_ALIVE_S = 75  # the API's idle keep-alive, as behind common load balancers (60 s)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="API processes on the port [CORRAL_API_WORKERS: 1]."),
    ] = None,
) -> None:
    """Run the HTTP API (uvicorn); with --workers N, N processes share the port."""
    import uvicorn

    from app.api.main import create_app

    settings = get_settings()
    settings.broker_url  # noqa: B018  (fail early with what to do)
    processes = workers or settings.api_workers
    common: dict[str, Any] = {
        "host": host or settings.api_host,
        "port": port or settings.api_port,
        "log_level": settings.log_level.lower(),
        # Longer than clients keep an idle connection (httpx and the OpenAI SDK: 5 s, the
        # same as uvicorn's default), so a client never reuses one the server has just
        # closed ("server disconnected without sending a response").
        "timeout_keep_alive": KEEP_ALIVE_S,
    }
    if processes == 1:
        uvicorn.run(create_app(), **common)
        return
    # Each process builds its own app (its own connections, caches and finish listener);
    # they share nothing but the database and Redis, which hold all state.
    uvicorn.run("app.api.main:create_app", factory=True, workers=processes, **common)


@app.command()
def worker(
    model: Annotated[str, typer.Option(help="Catalog name of the model this pool serves.")],
    gpu: Annotated[
        str,
        typer.Option(help="'auto' (the scheduler places it), a GPU index to pin to, or 'none'."),
    ] = "auto",
    concurrency: Annotated[int, typer.Option(min=1, help="Model processes (CPU pools).")] = 1,
    ctx: Annotated[
        int | None, typer.Option(help="Context to serve (default: the catalog's n_ctx).")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="Wait (visibly pending) when no GPU has room; else exit 3.")
    ] = True,
    parallel: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Steps decoded together in one process, one model copy (default: the "
            "catalog's parallel).",
        ),
    ] = None,
) -> None:
    """Run a worker pool for one model: consumes only queue ``model.<name>``."""
    run_worker = _worker_side(WORKER_LAUNCH)
    run_worker(model, gpu=gpu, concurrency=concurrency, n_ctx=ctx, wait=wait, parallel=parallel)


@app.command()
def beat() -> None:
    """Run Celery beat (periodic jobs) with a worker for the ``corral.system`` queue."""
    celery_app = _worker_side(WORKER_APP)
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery_app.worker_main(
        [
            "worker",
            "--beat",
            "--schedule",
            str(settings.data_dir / "celerybeat-schedule"),
            "-Q",
            SYSTEM_QUEUE,
            # Threads: a webhook waiting on a slow receiver never holds up an evaluation.
            "--pool",
            "threads",
            "--concurrency",
            "4",
            "-n",
            f"system.{os.getpid()}@%h",
            "--loglevel",
            settings.log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command(name="flower")
def flower_cmd(
    port: Annotated[int, typer.Option(help="Port.")] = 5555,
    address: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    basic_auth: Annotated[
        str | None,
        typer.Option(envvar="CORRAL_FLOWER_BASIC_AUTH", help="user:password for Flower."),
    ] = None,
) -> None:
    """Run Flower, Celery's monitor, behind basic auth."""
    if not basic_auth or ":" not in basic_auth:
        raise _fail("Flower needs --basic-auth USER:PASSWORD (or CORRAL_FLOWER_BASIC_AUTH)")
    celery_app = _worker_side(WORKER_APP)
    celery_app.start(
        [
            "flower",
            f"--port={port}",
            f"--address={address}",
            f"--basic-auth={basic_auth}",
            "--purge_offline_workers=60",
        ]
    )


def _load_spec(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc}") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        return json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise _fail(f"{path} is not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="Workflow spec, JSON or YAML.")],
    wait: Annotated[bool, typer.Option(help="Wait for the result and print it.")] = False,
    api_url: Annotated[
        str, typer.Option(envvar="CORRAL_API_URL", help="Base URL of the API.")
    ] = "http://127.0.0.1:8000",
    key: Annotated[str | None, typer.Option(envvar="CORRAL_API_KEY", help="API key.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 600.0,
) -> None:
    """Submit a workflow; with --wait, print each step's result when it ends."""
    if not key:
        raise _fail("an API key is needed: --key or CORRAL_API_KEY (`corral keys create NAME`)")
    spec = _load_spec(file)
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}) as client:
        resp = client.post("/v1/workflows", json=spec)
        if resp.status_code != 202:
            raise _fail(f"HTTP {resp.status_code}: {_detail(resp)}")
        wid = resp.json()["id"]
        console.print(f"submitted workflow [bold]{wid}[/bold]")
        if not wait:
            return
        run = wait_for(client, wid, timeout)
    print_run(run)
    raise typer.Exit(0 if run["status"] == "succeeded" else 1)


def _detail(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except ValueError:
        return resp.text
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)
    return str(detail)


def wait_for(client: httpx.Client, workflow_id: str, timeout_s: float) -> dict[str, Any]:
    """Long-poll a workflow (``?wait_s=``) until it ends (or the timeout passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        wait_s = max(0.0, min(30.0, deadline - time.monotonic()))
        run: dict[str, Any] = (
            client.get(f"/v1/workflows/{workflow_id}", params={"wait_s": wait_s}, timeout=60)
            .raise_for_status()
            .json()
        )
        if run["status"] != "running" or time.monotonic() > deadline:
            return run


def print_run(run: dict[str, Any]) -> None:
    """A workflow's steps as a table, then each step's output text."""
    table = Table(title=f"workflow {run['name']} ({run['id']}): {run['status']}")
    for col in ("step", "kind", "model", "status", "attempts", "tokens", "ms"):
        table.add_column(col)
    for s in run["steps"]:
        out = s.get("output") or {}
        tokens = f"{out.get('prompt_tokens', '')}/{out.get('completion_tokens', '')}"
        ms = f"{s['duration_ms']:.0f}" if s.get("duration_ms") is not None else ""
        table.add_row(s["id"], s["kind"], s["model"], s["status"], str(s["attempts"]), tokens, ms)
    console.print(table)
    for s in run["steps"]:
        out = s.get("output") or {}
        if "text" in out:
            console.print(f"[bold]{s['id']}[/bold]: {out['text']!r}")
        elif "vectors" in out:
            console.print(
                f"[bold]{s['id']}[/bold]: {len(out['vectors'])} vector(s) of {out['dim']}"
            )
        elif s.get("error"):
            console.print(f"[bold]{s['id']}[/bold]: [yellow]{s['error']}[/yellow]")
    if run.get("error"):
        console.print(f"[red]{run['error']}[/red]")


@app.command()
def status() -> None:
    """Redis, the database, live pools and queue lengths per model, workflows by status."""
    from app.cli.views import print_status

    raise typer.Exit(print_status(console))


@app.command()
def gpus() -> None:
    """GPUs, their reservations and free memory, and pools waiting for room."""
    from app.cli.views import print_gpus

    print_gpus(console)


app.command()(agent_cmd.agent)
app.command()(governance_cmd.rules)
app.command()(governance_cmd.alerts)
app.command()(governance_cmd.health)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key.")],
    admin: Annotated[bool, typer.Option(help="May change governance rules and silences.")] = False,
) -> None:
    """Create an API key and print it (it is shown only once)."""
    from app.store import db, keys

    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, name, admin=admin)
    print(key)


@keys_app.command("list")
def keys_list() -> None:
    """API keys: id, prefix, name, created, last used, revoked (never the key itself)."""
    from rich.table import Table
    from sqlmodel import select

    from app.store import db
    from app.store.tables import ApiKey

    table = Table("id", "prefix", "name", "admin", "created", "revoked")
    with db.session_scope() as session:
        for row in session.exec(select(ApiKey).order_by(ApiKey.id)).all():  # type: ignore[arg-type]
            table.add_row(
                str(row.id),
                row.prefix,
                row.name,
                "yes" if row.admin else "",
                row.created_at.isoformat(timespec="seconds"),
                row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "",
            )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's prefix (crl_PREFIX_…) or its id.")],
) -> None:
    """Revoke an API key. API processes stop accepting it within CORRAL_API_KEY_CACHE_S."""
    from app.store import db, keys

    prefix = key.split("_")[1] if key.startswith(keys.KEY_PREFIX) and key.count("_") >= 2 else key
    try:
        with db.session_scope(write=True) as session:
            row = keys.revoke_key(session, prefix)
    except LookupError as exc:
        raise _fail(str(exc)) from exc
    console.print(
        f"revoked key {row.id} ({row.name}, prefix {row.prefix}); API processes stop "
        f"accepting it within {get_settings().api_key_cache_s:g} s"
    )


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Migrate the database to the latest schema."""
    from app.store.migrate import upgrade

    upgrade(revision=revision)
    console.print(f"database at {get_settings().sqlalchemy_url.split('@')[-1]} is at {revision}")


# --- errors a person can read ---------------------------------------------------------
#
# A command that meets a configuration or service problem says what is wrong and what to
# do in one line on stderr and exits 2 (3: a pool waiting for GPU room gave up), never
# with a traceback. Lower-level exceptions become that line here, at the one boundary
# every command passes; anything else is a bug, and its traceback is worth seeing.

EXIT_CONFIG = 2
EXIT_NO_ROOM = 3


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines, tabs) as one space."""
    return " ".join(text.split())


def _redacted(url: str) -> str:
    """A service URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(unparsable)"


def _setting(getter: str) -> str:
    """A settings property (``sqlalchemy_url``, ``redis_url``) for a message; never raises."""
    try:
        return _redacted(str(getattr(get_settings(), getter) or "(unset)"))
    except Exception:  # the settings themselves are what is wrong: say nothing more
        return "(unreadable)"


def _invalid_settings(exc: ValidationError) -> str:
    problems = []
    for e in exc.errors(include_url=False):
        loc = e["loc"]
        var = f"CORRAL_{str(loc[0]).upper()}" if loc else "CORRAL_*"
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        problems.append(f"{var}{where}={e['input']!r}: {e['msg']}")
    return f"invalid setting {'; '.join(problems)}; fix or unset it"


def describe_error(exc: BaseException) -> tuple[str, int] | None:
    """What to print (one line) and the exit code for a problem of configuration or of a
    service; None for anything else. A CorralError that wraps a database or Redis error
    (``raise ... from``) is described by its cause, which knows what to do about it."""
    if isinstance(exc, PlacementError):
        return str(exc), EXIT_CONFIG if exc.permanent else EXIT_NO_ROOM
    if isinstance(exc, CorralError):
        cause = exc.__cause__
        known = cause is not None and not isinstance(cause, CorralError)
        return (_service_error(cause) if known else None) or str(exc), EXIT_CONFIG
    if isinstance(exc, ValidationError) and exc.title == "Settings":
        return _invalid_settings(exc), EXIT_CONFIG
    if isinstance(exc, SettingsError):
        return (
            f"invalid setting: {exc} (a list or object setting is JSON, e.g. "
            "CORRAL_TENSOR_SPLIT=[1, 1]); fix or unset it",
            EXIT_CONFIG,
        )
    message = _service_error(exc)
    if message is not None:
        return message, EXIT_CONFIG
    if isinstance(exc, httpx.HTTPStatusError):
        return f"the API answered HTTP {exc.response.status_code}: {_detail(exc.response)}", 1
    if isinstance(exc, httpx.InvalidURL):
        return f"the API URL (--api-url / CORRAL_API_URL) is not valid: {exc}", EXIT_CONFIG
    if isinstance(exc, httpx.TransportError):
        return (
            f"cannot reach the API at {exc.request.url.copy_with(query=None)}: {exc}; start "
            "it (`corral api`) or set --api-url / CORRAL_API_URL",
            EXIT_CONFIG,
        )
    return None


def _service_error(exc: BaseException | None) -> str | None:
    """The database's or Redis' error said with what to do; None for other errors."""
    if isinstance(exc, (OperationalError, ProgrammingError)) and (
        "no such table" in str(exc.orig) or type(exc.orig).__name__ == "UndefinedTable"
    ):
        return (
            f"the database {_setting('sqlalchemy_url')} has no Corral tables yet: "
            "run `corral db upgrade`"
        )
    if isinstance(exc, (OperationalError, InterfaceError)):
        return (
            f"the database {_setting('sqlalchemy_url')} is unavailable: {exc.orig}; check "
            "CORRAL_DATABASE_URL and that the database server is running"
        )
    if isinstance(exc, ArgumentError):
        return (
            f"CORRAL_DATABASE_URL is not a usable database URL: {exc}; e.g. "
            "postgresql://user@host:5432/corral or sqlite:////path/to/corral.db"
        )
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return (
            f"Redis at {_setting('redis_url')} is unavailable: {exc}; start it, or point "
            "CORRAL_REDIS_URL at a running Redis (`corral up` starts an embedded one)"
        )
    if isinstance(exc, ValueError) and "Redis URL must specify" in str(exc):
        return f"CORRAL_REDIS_URL={_setting('redis_url')!r} is not a Redis URL: {exc}"
    return None


def _log_level() -> str:
    """CORRAL_LOG_LEVEL for logging when it names a level, else INFO (reading the settings
    reports a bad value the usual way)."""
    level = os.environ.get("CORRAL_LOG_LEVEL", "INFO").strip().upper()
    return level if isinstance(logging.getLevelName(level), int) else "INFO"


def main() -> None:
    """Console-script entry point: runs the command; a problem of configuration or of a
    service (:func:`describe_error`) ends it with one line on stderr, not a traceback."""
    logging.basicConfig(
        level=_log_level(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "alembic", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except Exception as exc:
        described = describe_error(exc)
        if described is None:
            raise
        message, code = described
        err.print(f"[red]error:[/red] {escape(one_line(message))}", highlight=False)
        raise SystemExit(code) from exc


if __name__ == "__main__":
    main()
