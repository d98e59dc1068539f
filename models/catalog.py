"""The model catalog: which models Corral knows, where to get them, and how to serve them.

The catalog is data (``models/catalog.yaml``), validated once into :class:`CatalogEntry`
objects. :func:`load_catalog` caches per path and modification time, so an edited file is
picked up and an unchanged one is not parsed twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from app.core.errors import ConfigError, UnknownModelError

__all__ = ["CATALOG_PATH", "DEFAULT_N_CTX", "Catalog", "CatalogEntry", "load_catalog"]

CATALOG_PATH = Path(__file__).resolve().with_name("catalog.yaml")
DEFAULT_N_CTX = 8192
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CatalogEntry(BaseModel):
    """One model in the catalog: what it is, where its GGUF comes from, how to serve it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["chat", "embed"]
    description: str = ""
    source_url: str | None = None
    # A Python package (its import name) that ships the file in its directory: `corral
    # models pull` places it from there, no download, when the package is installed.
    package: str | None = None
    file: str
    size_bytes: int | None = Field(default=None, gt=0)
    sha256: str | None = None
    context_length: int = Field(gt=0)
    # Omitted: min(context_length, DEFAULT_N_CTX), filled in by _default_n_ctx below.
    n_ctx: int = Field(default=DEFAULT_N_CTX, gt=0)
    chat_format: str | None = None
    tiny: bool = False
    split_allowed: bool = False
    parallel: int = Field(default=1, ge=1)
    # Scheduling: a higher priority may evict idle lower-priority pools; ``reserve_gpus``
    # ("INDEX" on every host, or "HOST:INDEX") keeps memory for this model even when no
    # worker holds it, ``reserve_bytes`` of it (default: the estimate at n_ctx).
    priority: int = Field(default=0, ge=0, le=100)
    reserve_gpus: tuple[str, ...] = ()
    reserve_bytes: int | None = Field(default=None, gt=0)
    # The host agent (`corral agent`): seconds an idle pool stays loaded (default
    # CORRAL_KEEP_ALIVE_S; 0 unloads as soon as it is idle, -1 never), and whether the
    # model is started as soon as the agent starts, and kept.
    keep_alive: float | None = Field(default=None, ge=-1)
    preload: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_n_ctx(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("n_ctx") is None:
            context_length = data.get("context_length")
            if isinstance(context_length, int) and not isinstance(context_length, bool):
                return {**data, "n_ctx": min(context_length, DEFAULT_N_CTX)}
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"model names are lowercase letters, digits, '.', '_' and '-', got {value!r}"
            )
        return value

    @field_validator("file")
    @classmethod
    def _check_file(cls, value: str) -> str:
        if not value or Path(value).name != value or value.startswith("."):
            raise ValueError(f"file must be a plain file name inside the models dir, got {value!r}")
        return value

    @field_validator("source_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"source_url must be an http(s) URL, got {value!r}")
        return value

    @field_validator("sha256", mode="before")
    @classmethod
    def _check_sha256(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            if not _SHA256.match(value):
                raise ValueError(f"sha256 must be 64 hex digits, got {len(value)} characters")
        return value

    @model_validator(mode="after")
    def _check_n_ctx(self) -> CatalogEntry:
        if self.n_ctx > self.context_length:
            raise ValueError(
                f"n_ctx must be ≤ the model's context_length {self.context_length}, "
                f"got {self.n_ctx}"
            )
        return self

    @property
    def steps(self) -> tuple[str, ...]:
        """The workflow step kinds this model serves."""
        return ("generate", "chat") if self.kind == "chat" else ("embed",)


@dataclass(frozen=True)
class Catalog:
    """The catalog's entries, in file order, with lookups by name."""

    entries: tuple[CatalogEntry, ...]
    path: Path | None = None
    _by_name: dict[str, CatalogEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, CatalogEntry] = {}
        for entry in self.entries:
            if entry.name in by_name:
                where = f"{self.path}: " if self.path else ""
                raise ConfigError(f"{where}model {entry.name!r} is listed twice; keep one entry")
            by_name[entry.name] = entry
        object.__setattr__(self, "_by_name", by_name)

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        """The model names, in catalog order."""
        return [entry.name for entry in self.entries]

    def get(self, name: str) -> CatalogEntry:
        """The entry called ``name``; raises UnknownModelError listing the known names."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownModelError(
                f"unknown model {name!r}; the catalog has: {', '.join(self.names())}"
            ) from None

    def path_for(self, name_or_entry: str | CatalogEntry, models_dir: Path) -> Path:
        """Where the model's GGUF file lives (or will live) in ``models_dir``."""
        entry = self.get(name_or_entry) if isinstance(name_or_entry, str) else name_or_entry
        return models_dir / entry.file

    def present(self, models_dir: Path) -> list[CatalogEntry]:
        """The entries whose file exists in ``models_dir`` (not verified; see gguf_info)."""
        return [entry for entry in self.entries if (models_dir / entry.file).is_file()]


_cache: dict[Path, tuple[tuple[int, int, int, int], Catalog]] = {}


def load_catalog(path: Path = CATALOG_PATH) -> Catalog:
    """Load and validate the catalog at ``path``, cached per path and file version.

    A cached catalog is reused while the file it was read from (device, inode, size and
    modification time, through any symlink) is unchanged: one ``stat`` a call, which the
    API pays on every submit. Raises :class:`~app.core.errors.ConfigError` naming the file
    (and the entry) when the file is missing, is not valid YAML, or an entry does not
    validate.
    """
    given = path.expanduser()
    try:
        st = given.stat()
    except OSError as exc:
        raise ConfigError(
            f"{given.absolute()}: cannot read the model catalog ({exc.strerror}); "
            "check CORRAL_CATALOG_PATH"
        ) from exc
    version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _cache.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    resolved = given.resolve()
    catalog = Catalog(tuple(_parse(resolved)), path=resolved)
    _cache[path] = (version, catalog)
    return catalog


def _parse(path: Path) -> list[CatalogEntry]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    items = data.get("models") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a top-level 'models:' list of model entries")
    entries = []
    for index, item in enumerate(items):
        label = f"entry #{index + 1}"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label += f" ({item['name']!r})"
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: model {label} must be a mapping of fields")
        try:
            entries.append(CatalogEntry.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(_describe(error) for error in exc.errors())
            raise ConfigError(f"{path}: model {label}: {problems}") from exc
    return entries


def _describe(error: ErrorDetails) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    msg = str(error["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
