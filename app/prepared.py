"""The engine's statements, compiled once per dialect and run on the driver's cursor.

SQLAlchemy's ``Connection.execute`` of a Core statement builds an execution context for
every call: a cache lookup keyed by the statement's structure, the parameters processed
through the compiled form, events, a cursor result with its metadata. For the engine's
hot statements (claim a step, lock a workflow, read and write its steps, insert a run,
read its view) that machinery cost more than SQLite's own work: in process, a claim's
``UPDATE … RETURNING`` took 0.37 ms of CPU through ``execute`` on a held connection and
0.20 ms as the same SQL on the sqlite3 cursor (``benchmarks.engine_cost`` counts the
engine's calls).

A :class:`Prepared` statement is SQLAlchemy's own compilation of the statement for the
connection's dialect: the same SQL text, the parameters through SQLAlchemy's own
``construct_params`` and the types' own bind processors, the rows through the types' own
result processors. Only the per-call machinery is skipped. Tests hold the SQL, the
parameters the driver receives and the rows equal to what ``Connection.execute`` sends
and returns, on SQLite and PostgreSQL.

A statement that SQLAlchemy would complete at execution (an ``IN`` list expanded per
call, a column default or ``onupdate`` computed in Python) is run by
``Connection.execute`` as before. Driver errors are raised as SQLAlchemy's
(``IntegrityError``, ``OperationalError``, …); a disconnect invalidates the connection
and the pool's older connections, as ``Connection.execute`` does.
"""

from __future__ import annotations

import threading
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import Compiled

Params = Mapping[str, Any]
_Processor = Callable[[Any], Any] | None


class Rows(list[Any]):
    """A statement's rows (named tuples), with the two accessors the engine uses."""

    def first(self) -> Any:
        return self[0] if self else None

    def all(self) -> list[Any]:
        return self


class Prepared:
    """One statement compiled for one dialect (and, for an ``INSERT``, one set of keys)."""

    def __init__(
        self, stmt: Executable, dialect: Dialect, columns_keys: Sequence[str] | None
    ) -> None:
        compiled: Compiled = stmt.compile(dialect=dialect, column_keys=columns_keys)  # type: ignore[attr-defined]
        self.compiled = compiled
        self.sql: str = compiled.string
        self.positional: bool = bool(getattr(dialect, "positional", False))
        self.order: tuple[str, ...] = tuple(getattr(compiled, "positiontup", None) or ())
        binds = getattr(compiled, "binds", {})
        processors = {
            name: bind.type.dialect_impl(dialect).bind_processor(dialect)
            for name, bind in binds.items()
        }
        self.bind_processors = {k: v for k, v in processors.items() if v is not None}
        columns = list(getattr(stmt, "exported_columns", ()))
        self.returns = bool(columns)
        self.result_processors: list[_Processor] = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]
        keys = [c.key for c in columns]
        self.row = namedtuple("Row", keys, rename=True) if columns else None
        # What only a full execution completes: expanding IN lists, Python-side defaults.
        self.supported = not (
            getattr(compiled, "_post_compile_expanded_state", None) is not None
            or any(getattr(b, "expanding", False) for b in binds.values())
            or getattr(compiled, "insert_prefetch", None)
            or getattr(compiled, "update_prefetch", None)
            or getattr(compiled, "post_compile_params", None)
            or getattr(compiled, "literal_execute_params", None)
            or getattr(compiled, "escaped_bind_names", None)
        )

    def parameters(self, values: Params) -> Any:
        """The parameters the driver receives for ``values``, as SQLAlchemy builds them."""
        params: dict[str, Any] = dict(self.compiled.construct_params(dict(values)) or {})
        for name, process in self.bind_processors.items():
            if name in params:
                params[name] = process(params[name])
        if self.positional:
            return tuple(params[name] for name in self.order)
        return params

    def rows(self, raw: Iterable[Sequence[Any]]) -> Rows:
        processors, make = self.result_processors, self.row
        assert make is not None
        out = Rows()
        for values in raw:
            out.append(
                make(
                    *(p(v) if p is not None else v for p, v in zip(processors, values, strict=True))
                )
            )
        return out


_cache: dict[tuple[int, int, tuple[str, ...] | None], tuple[Executable, Prepared]] = {}
_cache_lock = threading.Lock()


def prepare(stmt: Executable, dialect: Dialect, keys: Sequence[str] | None = None) -> Prepared:
    """``stmt`` compiled for ``dialect``, once per process (statements are module constants)."""
    cache_key = (id(stmt), id(dialect), tuple(keys) if keys is not None else None)
    found = _cache.get(cache_key)
    if found is None or found[0] is not stmt:
        with _cache_lock:
            found = _cache[cache_key] = (stmt, Prepared(stmt, dialect, keys))
    return found[1]


def prepared_for(conn: Connection, stmt: Executable, first: Params) -> Prepared:
    """What :func:`execute` runs for ``stmt`` with (the first of its) parameters ``first``."""
    keys = sorted(first) if getattr(stmt, "is_insert", False) else None
    return prepare(stmt, conn.dialect, keys)


def execute(
    conn: Connection,
    stmt: Executable,
    params: Params | Sequence[Params] | None = None,
) -> Rows:
    """Run ``stmt`` on ``conn``'s driver connection (a list of parameter sets: executemany);
    its rows, if it returns any. Falls back to ``conn.execute`` where :class:`Prepared`
    does not apply."""
    many: list[Params] | None = list(params) if isinstance(params, list) else None
    if many is not None and len(many) == 1:
        one, many = many[0], None  # one row: a plain execute (psycopg's executemany pipelines)
    else:
        one = {} if params is None or many is not None else params  # type: ignore[assignment]
    prepared = prepared_for(conn, stmt, many[0] if many else one)
    if not prepared.supported or (
        # Many rows into a driver whose executemany is a statement per row: SQLAlchemy's
        # "insertmanyvalues" sends them as one INSERT of many VALUES (PostgreSQL).
        many
        and getattr(stmt, "is_insert", False)
        and getattr(conn.dialect, "use_insertmanyvalues_wo_returning", False)
    ):
        result = conn.execute(stmt, many if many is not None else dict(one))
        return Rows(result.all()) if result.returns_rows else Rows()
    driver = conn.connection.driver_connection
    assert driver is not None
    cursor = driver.cursor()
    try:
        if many is not None:
            cursor.executemany(prepared.sql, [prepared.parameters(p) for p in many])
            return Rows()
        cursor.execute(prepared.sql, prepared.parameters(one))
        return prepared.rows(cursor.fetchall()) if prepared.returns else Rows()
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _translated(conn, prepared.sql, params, exc) from exc
    finally:
        cursor.close()


Statement = tuple[Executable, Params | Sequence[Params]]


def script(
    conn: Connection,
    statements: Sequence[Statement],
    *,
    begin: bool = False,
    commit: bool = False,
) -> list[Rows]:
    """Run ``statements`` in order on ``conn``; the rows of each (empty for a write).

    On PostgreSQL they go to the server in one round trip: each is bound on the client
    (psycopg's own quoting, :meth:`psycopg.ClientCursor.mogrify`) and the lot is sent as
    one simple query, with ``BEGIN`` before and ``COMMIT`` after when asked. A simple
    query runs its statements in order, each with a fresh snapshot (so a read after a
    ``FOR UPDATE`` sees what the lock waited for), and without ``BEGIN``/``COMMIT`` as
    one implicit transaction: all or nothing. The connection must be in autocommit
    (:func:`app.db.connection_scope` with ``explicit=True``): the script, not the driver,
    opens and ends the transaction. A list of parameter sets runs the statement once per
    set, an ``INSERT`` as one statement of many ``VALUES``.

    Elsewhere (SQLite: calls into this process, no round trips to save) each statement
    runs through :func:`execute`, and the connection's own transaction is the one.
    """
    dialect = conn.dialect
    if dialect.name != "postgresql":
        return [execute(conn, stmt, params) for stmt, params in statements]
    import psycopg  # the PostgreSQL driver: imported only where it is the dialect's

    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    cursor = psycopg.ClientCursor(driver)
    parts: list[str] = ["BEGIN"] if begin else []
    # For each part, the statement whose rows it returns (its index in ``out``), if any.
    readers: list[tuple[int, Prepared] | None] = [None] * len(parts)
    sql: list[str] = []  # the statements unbound, for an error: no values in a message
    out = [Rows() for _ in statements]
    try:
        for index, (stmt, params) in enumerate(statements):
            many: list[Params] = list(params) if isinstance(params, list) else [params]  # type: ignore[list-item]
            if not many:
                continue
            found = prepared_for(conn, stmt, many[0])
            if not found.supported:
                raise ValueError(f"not a statement a script can run: {found.sql}")
            bound = [cursor.mogrify(found.sql, found.parameters(p)) for p in many]
            if len(bound) > 1 and getattr(stmt, "is_insert", False) and not found.returns:
                head = found.sql[: found.sql.index(" VALUES ") + len(" VALUES ")]
                bound = [head + ", ".join(b[len(head) :] for b in bound)]
            parts.extend(bound)
            sql.append(found.sql)
            readers.extend([(index, found) if found.returns else None] * len(bound))
        if commit:
            parts.append("COMMIT")
            readers.append(None)
        if parts:
            cursor.execute("; ".join(parts))
        for i, reader in enumerate(readers):
            if i:
                cursor.nextset()
            if reader is not None:
                out[reader[0]].extend(reader[1].rows(cursor.fetchall()))
        return out
    except dialect.loaded_dbapi.Error as exc:
        raise _translated(conn, "; ".join(sql), None, exc) from exc
    finally:
        cursor.close()


def _translated(conn: Connection, sql: str, params: Any, exc: Any) -> BaseException:
    """The driver's error as SQLAlchemy raises it; a lost connection is invalidated, and
    with it every connection the pool handed out before (as ``Connection.execute`` does)."""
    dialect = conn.dialect
    disconnect = dialect.is_disconnect(exc, conn.connection.dbapi_connection, None)
    if disconnect:
        pool = conn.engine.pool
        invalidate_pool = getattr(pool, "_invalidate", None)
        if invalidate_pool is not None:
            invalidate_pool(conn.connection, exc)
        conn.invalidate(exc)
    error: BaseException = DBAPIError.instance(
        sql,
        params,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=disconnect,
        dialect=dialect,
    )
    return error
