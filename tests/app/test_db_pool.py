"""PostgreSQL connections: pinged before use only after an idle spell, on a private server
that the tests restart (app/store/db.py, _ping_when_idle)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from app.store import db
from tests.utils.databases import PrivatePostgres

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(private_pg_engine: Engine) -> Engine:
    return private_pg_engine


@pytest.fixture
def pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every ping the engine makes (the dialect's own, counted)."""
    made: list[float] = []
    original = engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        made.append(1.0)
        return original(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    return made


def one(engine: Engine) -> int:
    with engine.begin() as conn:
        value: int = conn.execute(text("SELECT 1")).scalar_one()
    return value


def test_back_to_back_transactions_are_not_pinged(engine: Engine, pings: list[float]) -> None:
    for _ in range(20):
        assert one(engine) == 1
    assert len(pings) == 1  # the new connection's first checkout only


def test_a_connection_idle_past_the_window_is_pinged(
    engine: Engine, pings: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    one(engine)
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)  # any gap is idle now
    one(engine)
    one(engine)
    assert len(pings) == 3


def test_a_server_restart_while_idle_costs_a_reconnect_not_an_error(
    engine: Engine, private_pg: PrivatePostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert one(engine) == 1  # a pooled connection to the old server process
    private_pg.stop()
    private_pg.start()
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)  # the restart took longer than this
    assert one(engine) == 1  # the ping found the dead connection; the pool made a new one


def test_a_restart_inside_the_window_fails_one_call_then_recovers(
    engine: Engine, private_pg: PrivatePostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trade made for the saved round trips: a connection used moments before the
    server went away is not pinged, so one call sees the disconnect (a 503 in the API, a
    retry for a step); SQLAlchemy then drops the pool's old connections."""
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 3600.0)
    assert one(engine) == 1
    private_pg.stop()
    private_pg.start()
    with pytest.raises(OperationalError):
        one(engine)
    assert one(engine) == 1
