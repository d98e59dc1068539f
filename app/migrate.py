"""Running Alembic migrations from Corral (``corral db upgrade``) and from tests."""

from __future__ import annotations

from alembic.config import Config

from alembic import command
from app.core.config import PACKAGE_ROOT, get_settings


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for Corral's migrations against ``url`` (default: the settings')."""
    cfg = Config(str(PACKAGE_ROOT / "alembic" / "alembic.ini"))
    cfg.set_main_option("script_location", str(PACKAGE_ROOT / "alembic"))
    cfg.attributes["url"] = url or get_settings().sqlalchemy_url
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "-1") -> None:
    """Migrate the database at ``url`` down to ``revision``."""
    command.downgrade(alembic_config(url), revision)
