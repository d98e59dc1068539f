"""Corral's settings: one class, read from ``CORRAL_*`` variables, validated once.

Every process (API, worker, beat, CLI) reads the same class. Tests replace it through one
seam, :func:`use_settings`, or by setting ``CORRAL_*`` variables for a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CATALOG = PACKAGE_ROOT / "models" / "catalog.yaml"


class HeldReservation(BaseModel):
    """A GPU reservation a model worker holds: its ledger id, host and GPU index."""

    model_config = ConfigDict(frozen=True)

    id: str
    host: str
    gpu: int = Field(ge=0)


class Settings(BaseSettings):
    """All of Corral's configuration, from ``CORRAL_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore", frozen=True)

    # Where things live.
    data_dir: Path = Field(default=Path(".corral"), description="state of the embedded services")
    models_dir: Path | None = Field(default=None, description="GGUF files; default DATA_DIR/models")
    catalog_path: Path = DEFAULT_CATALOG

    # Services. Unset means: `corral up` starts an embedded Redis, and SQLite in DATA_DIR.
    redis_url: str | None = None
    database_url: str | None = None
    database_prepare: bool = Field(
        default=True,
        description="PostgreSQL: psycopg prepares the statements a connection runs often "
        "on the server (parsed and planned once); false behind a pooler in transaction mode "
        "(PgBouncer), where a session's prepared statements are not its own",
    )

    # API.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="API processes serving the port (uvicorn workers); one process is bound "
        "by the GIL to about one core",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ui_session_ttl_s: int = Field(
        default=8 * 3600, ge=60, description="a dashboard sign-in lasts this long unused"
    )
    ui_secure_cookie: bool = Field(
        default=True,
        description="the dashboard's session cookie is Secure (browsers send it over HTTPS "
        "and to localhost only); false for a plain-HTTP deployment on a trusted network",
    )

    # Limits on what a client may submit.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_steps: int = Field(default=200, ge=1)
    max_prompt_chars: int = Field(default=200_000, ge=1)
    max_step_timeout_s: float = Field(default=3600.0, gt=0)
    default_step_timeout_s: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    max_backoff_s: float = Field(default=3600.0, ge=0)
    max_list_limit: int = Field(default=200, ge=1)
    api_key_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="how long an API process trusts a key it verified (a revoked key stops "
        "working within this); 0 reads the database on every request",
    )

    # Workers.
    host: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="this host's name in pool names, heartbeats and the GPU ledger",
    )
    worker_heartbeat_s: float = Field(default=10.0, gt=0)
    cancel_poll_s: float = Field(default=0.1, gt=0)
    stream_flush_s: float = Field(
        default=0.02, ge=0, description="token deltas after the first are sent this often"
    )
    stream_ttl_s: int = Field(
        default=3600, ge=1, description="a step's token stream is kept this long after it"
    )
    reconcile_s: float = Field(default=15.0, gt=0, description="beat: how often to reconcile")
    reconcile_after_s: float = Field(
        default=30.0, gt=0, description="a ready step not on the broker after this is resent"
    )
    # GPU scheduler.
    gpus: str = Field(
        default="auto", description="'auto' (NVML), 'none', or declared: '0:24GiB,1:24GiB'"
    )
    placement_policy: Literal["binpack", "spread"] = "binpack"
    gpu_headroom_bytes: int = Field(default=256 * 2**20, ge=0, description="kept free per GPU")
    gpu_overhead_bytes: int = Field(default=512 * 2**20, ge=0, description="CUDA context etc.")
    kv_cache_type: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] = "f16"
    flash_attention: bool = False
    lease_ttl_s: float = Field(default=30.0, gt=0, description="a dead holder's lease lasts this")
    cleanup_s: float = Field(
        default=30.0, gt=0, description="beat: fragmentation cleanup (dead leases, stranded memory)"
    )
    placement_poll_s: float = Field(default=2.0, gt=0, description="retry period when pending")
    # The host agent (`corral agent`).
    keep_alive_s: float = Field(
        default=300.0,
        ge=-1,
        description="an idle pool the agent started unloads after this (catalog keep_alive "
        "overrides; 0: as soon as it is idle; -1: never)",
    )
    agent_poll_s: float = Field(default=1.0, gt=0, description="how often the agent looks")
    agent_start_timeout_s: float = Field(
        default=600.0, gt=0, description="a pool the agent started must be serving by then"
    )

    # One model worker: `corral worker` sets these in its own environment, after placing
    # the model, for the pool processes it starts (they read them when they load it).
    worker_model: str | None = Field(default=None, description="the catalog model it serves")
    worker_ctx: int | None = Field(
        default=None, ge=1, description="the context it loads; unset: the catalog's n_ctx"
    )
    worker_parallel: int | None = Field(
        default=None, ge=1, description="sequences it decodes at once; unset: the catalog's"
    )
    n_gpu_layers: int = Field(default=0, ge=-1, description="layers on the GPU; -1: every one")
    main_gpu: int = Field(default=0, ge=0, description="index among the visible GPUs")
    tensor_split: tuple[float, ...] | None = Field(
        default=None, description="each visible GPU's share of the layers, JSON: [1, 1]"
    )
    n_threads: int | None = Field(default=None, ge=1, description="unset: llama.cpp's choice")
    reservations: tuple[HeldReservation, ...] = Field(
        default=(),
        description='the reservations it holds, JSON: [{"id": ..., "host": ..., "gpu": 0}]',
    )

    # Chaos testing: "STEP_ID:N,..." makes the first N attempts of steps with that id fail
    # inside the worker, through the real failure path. Empty (the default) disables it.
    fault_injection: str = ""

    # Conversation memory (app/memory).
    memory_ttl_s: int = Field(
        default=30 * 86400, ge=1, description="a conversation's TTL, renewed on activity"
    )
    memory_max_ttl_s: int = Field(default=365 * 86400, ge=1)
    memory_prune_s: float = Field(
        default=300.0, gt=0, description="beat: how often expired conversations leave the lists"
    )
    memory_max_message_chars: int = Field(default=100_000, ge=1)
    memory_block_limit: int = Field(default=2000, ge=1, description="a new block's char limit")
    memory_max_block_limit: int = Field(default=20_000, ge=1)
    memory_block_history: int = Field(default=50, ge=0, description="edits kept per block")
    memory_embed_model: str = Field(
        default="auto", description="'auto': the first embed model present; '' turns it off"
    )
    memory_embed_batch: int = Field(default=32, ge=1, le=256)
    memory_embed_timeout_s: float = Field(default=10.0, gt=0, description="query embeddings")
    memory_query_prefix: str = Field(default="", description="e.g. 'search_query: ' (nomic)")
    memory_document_prefix: str = Field(default="", description="e.g. 'search_document: '")
    memory_vector_index: Literal["auto", "scan", "redisearch"] = "auto"
    memory_vector_cache_mb: int = Field(default=256, ge=0, description="scan index cache")
    memory_summary_model: str = Field(
        default="", description="'' summarises inline on the chat step's own model"
    )
    memory_summary_max_tokens: int = Field(default=256, ge=16)
    memory_respond_timeout_s: float = Field(default=120.0, gt=0)

    # Consolidation (app/memory/consolidate.py): conversations become long-term memory.
    consolidate_s: float = Field(default=900.0, gt=0, description="beat: how often it looks")
    consolidate_idle_s: float = Field(
        default=1800.0, ge=0, description="a conversation quiet this long is consolidated"
    )
    consolidate_model: str = Field(default="", description="'' = the first chat model present")
    consolidate_window: str = Field(
        default="", description="UTC 'HH:MM-HH:MM' when beat may run it; '' = any time"
    )
    consolidate_max_items: int = Field(default=200, ge=1, description="conversations per run")
    consolidate_batch: int = Field(default=8, ge=1, le=64, description="conversations per task")
    consolidate_max_tokens: int = Field(default=512, ge=64, description="per model answer")
    consolidate_max_facts: int = Field(default=6, ge=1, le=32, description="per answer")
    consolidate_dedupe: float = Field(
        default=0.92, gt=0, le=1, description="cosine above which a fact repeats an entry"
    )
    consolidate_lease_s: float = Field(
        default=900.0, gt=0, description="a claimed conversation is free again after this"
    )

    # Governance (app/governance): rules that beat evaluates.
    governance_interval_s: float = Field(
        default=15.0, gt=0, description="beat: how often the rules are evaluated"
    )
    governance_window_s: float = Field(
        default=300.0,
        gt=0,
        description="the window of rates and percentiles (step error rate, latency, tokens/s) "
        "on /metrics and in conditions that name none",
    )
    governance_forget_s: float = Field(
        default=3600.0, gt=0, description="a pool whose heartbeat stopped is shown this long"
    )
    webhook_secret: str = Field(
        default="", description="signs webhook alerts (HMAC-SHA256) unless a rule names its own"
    )
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=60)
    webhook_max_retries: int = Field(default=5, ge=0, le=20)

    @field_validator("consolidate_window")
    @classmethod
    def _window(cls, value: str) -> str:
        from app.core.window import parse_window

        parse_window(value)  # raises ValueError naming the format
        return value.strip()

    @field_validator("data_dir", "models_dir", "catalog_path")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @property
    def models_path(self) -> Path:
        """The directory that holds GGUF files."""
        return self.models_dir or self.data_dir / "models"

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL, SQLite in DATA_DIR when none is set; psycopg 3 for PostgreSQL."""
        url = self.database_url or f"sqlite:///{self.data_dir / 'corral.db'}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def broker_url(self) -> str:
        """The Redis URL; raises ConfigError with what to do when none is set."""
        if not self.redis_url:
            raise ConfigError(
                "CORRAL_REDIS_URL is not set: run `corral up` (it starts an embedded Redis), "
                "or point CORRAL_REDIS_URL at a Redis server, e.g. redis://127.0.0.1:6379/0"
            )
        return self.redis_url

    def fault_plan(self) -> dict[str, int]:
        """Parse ``fault_injection`` into {step id: attempts to fail}."""
        plan: dict[str, int] = {}
        for item in filter(None, (p.strip() for p in self.fault_injection.split(","))):
            step_id, _, count = item.partition(":")
            if not count.isdigit():
                raise ConfigError(
                    f"CORRAL_FAULT_INJECTION must be 'STEP_ID:N,...', got {self.fault_injection!r}"
                )
            plan[step_id] = int(count)
        return plan


_override: Settings | None = None


@lru_cache(maxsize=1)
def _from_env() -> Settings:
    return Settings()


def get_settings() -> Settings:
    """The settings in force: the test override if any, else the environment's (read once)."""
    return _override if _override is not None else _from_env()


def reload_settings() -> Settings:
    """Forget the cached settings and read the environment again."""
    _from_env.cache_clear()
    return get_settings()


@contextmanager
def use_settings(settings: Settings) -> Iterator[Settings]:
    """Replace the settings for the duration of the block (the tests' seam)."""
    global _override
    previous, _override = _override, settings
    try:
        yield settings
    finally:
        _override = previous


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``CORRAL_*`` variables that reproduce ``settings`` in a child process (strings
    as they are, every other value as JSON, which is how the settings parse it back)."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"CORRAL_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env
