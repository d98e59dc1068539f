"""The wheel carries every package and the database migrations: an installed Corral (not a
source checkout) can migrate a database."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from app.core.config import PACKAGE_ROOT

pytestmark = pytest.mark.slow


def _listed_packages() -> set[str]:
    config = tomllib.loads((PACKAGE_ROOT / "pyproject.toml").read_text())
    return set(config["tool"]["setuptools"]["packages"])


def test_the_package_list_names_every_package_in_the_tree() -> None:
    in_tree = {
        ".".join(init.parent.relative_to(PACKAGE_ROOT).parts)
        for top in ("app", "workers", "models")
        for init in (PACKAGE_ROOT / top).rglob("__init__.py")
    }
    assert in_tree == _listed_packages() - {"corral_migrations", "corral_migrations.versions"}


def test_an_installed_wheel_migrates_a_database(tmp_path: Path) -> None:
    # Built from a copy of what the wheel is made of: setuptools writes build/ next to it.
    source = tmp_path / "source"
    for name in ("app", "workers", "models", "alembic"):
        shutil.copytree(
            PACKAGE_ROOT / name,
            source / name,
            ignore=shutil.ignore_patterns("__pycache__", "files", "*.gguf", "*.part"),
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PACKAGE_ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("corral-*.whl")
    target = tmp_path / "site"
    pip_install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q"]
    installed = subprocess.run(
        [*pip_install, "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert not (target / "alembic").exists()  # that name is the Alembic library's

    database = tmp_path / "installed.db"
    script = (
        "from app.store.migrate import script_location, upgrade\n"
        "print(script_location())\n"
        f"upgrade('sqlite:///{database}')\n"
    )
    # Run away from the checkout, with the installed copy first on the path.
    ran = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    assert Path(ran.stdout.strip().splitlines()[-1]) == target / "corral_migrations"
    with sqlite3.connect(database) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"workflow_run", "step_run", "api_key", "alembic_version"} <= tables
