"""Running Alembic migrations from Corral (``corral db upgrade``) and from tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic.config import Config

from alembic import command
from app.core.config import PACKAGE_ROOT, get_settings
from app.core.errors import ConfigError

# The scripts are alembic/ in a source tree; an installed wheel carries the same files as
# the package `corral_migrations` (see pyproject.toml).
MIGRATIONS_PACKAGE = "corral_migrations"


def script_location() -> Path:
    """Where Alembic's scripts are: the source tree's alembic/, else the installed copy."""
    source = PACKAGE_ROOT / "alembic"
    if (source / "env.py").is_file():
        return source
    spec = importlib.util.find_spec(MIGRATIONS_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "env.py").is_file():
            return Path(location)
    raise ConfigError(
        f"Corral's database migrations are missing: neither {source} nor an installed "
        f"{MIGRATIONS_PACKAGE!r} package has env.py; reinstall Corral"
    )


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for Corral's migrations against ``url`` (default: the settings')."""
    location = script_location()
    cfg = Config(str(location / "alembic.ini"))
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["url"] = url or get_settings().sqlalchemy_url
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "-1") -> None:
    """Migrate the database at ``url`` down to ``revision``."""
    command.downgrade(alembic_config(url), revision)
