"""PostgreSQL connections survive a server restart: the pool pings a connection before
handing it out (app/store/db.py), on a private server that the test restarts."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from tests.utils.databases import PrivatePostgres

pytestmark = pytest.mark.slow


def one(engine: Engine) -> int:
    with engine.begin() as conn:
        value: int = conn.execute(text("SELECT 1")).scalar_one()
    return value


def test_a_server_restart_costs_a_reconnect_not_an_error(
    private_pg_engine: Engine, private_pg: PrivatePostgres
) -> None:
    assert one(private_pg_engine) == 1  # a pooled connection to the old server process
    old = private_pg_engine.pool.checkedin()
    private_pg.stop()
    private_pg.start()
    assert one(private_pg_engine) == 1  # the ping found the dead connection; a new one served
    assert old == 1
