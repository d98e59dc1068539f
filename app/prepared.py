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

import hashlib
import re
import threading
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

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
        # As a statement prepared on a PostgreSQL session: its name, the PREPARE that
        # creates it and the EXECUTE that runs it (None for another parameter style).
        self.server = None if self.positional else _server_form(self.sql)
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


_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%|%s")


class ServerForm(NamedTuple):
    """A statement as a named statement on a PostgreSQL session."""

    name: str  # from the statement's text
    prepare: str  # ``PREPARE name AS …``, with ``$n`` for each distinct placeholder
    execute: str  # ``EXECUTE name(%(a)s, …)``: the call as a template to bind
    order: tuple[str, ...]  # the parameters' names, in the call's order


def _server_form(sql: str) -> ServerForm | None:
    """``sql`` (``%(name)s`` placeholders) as a named statement on the server; None for a
    statement with positional placeholders."""
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        name = match.group(1)
        if name is None:  # a positional placeholder: not this form
            raise ValueError(sql)
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    try:
        body = _PLACEHOLDER.sub(number, sql)
    except ValueError:
        return None
    name = "corral_" + hashlib.sha1(sql.encode(), usedforsecurity=False).hexdigest()[:24]
    run = f"EXECUTE {name}({', '.join(f'%({n})s' for n in order)})" if order else f"EXECUTE {name}"
    return ServerForm(name, f"PREPARE {name} AS {body}", run, tuple(order))


class Binder:
    """Binds values into a statement's text on the client, as psycopg's client-side
    cursors do: each value through the cursor's own dumpers and quoting
    (``Transformer.as_literal``, what :meth:`psycopg.ClientCursor.mogrify` calls per
    value), ``NULL`` for None.

    A call of a named statement (:class:`ServerForm`) is bound here directly: its values
    are known by name and in order, and ``mogrify`` would parse its template, check and
    reorder its parameters and format the result on every call: 12 µs of CPU against 6
    for an eight-value call, and a submit's script composed in 30 µs against 36 (measured
    in process, ``benchmarks/ROUNDS.md``, twenty-third round). Any other text (a many-row
    ``INSERT``, or every statement with preparing off) goes through ``mogrify``."""

    __slots__ = ("_encoding", "_literal", "mogrify")

    def __init__(self, cursor: Any) -> None:
        from psycopg.adapt import Transformer  # imported only where PostgreSQL is the dialect

        self.mogrify: Callable[[str, Any], str] = cursor.mogrify
        self._literal: Callable[[Any], bytes] = Transformer.from_context(cursor).as_literal
        self._encoding: str = cursor.connection.info.encoding

    def call(self, form: ServerForm, params: Params) -> str:
        """``form``'s ``EXECUTE`` with ``params`` bound."""
        if not form.order:
            return form.execute
        literal = self._literal
        values = b", ".join(
            [b"NULL" if (v := params[n]) is None else literal(v) for n in form.order]
        )
        return f"EXECUTE {form.name}({values.decode(self._encoding)})"


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
    return _prepared(conn.dialect, stmt, first)


def _prepared(dialect: Dialect, stmt: Executable, first: Params) -> Prepared:
    keys = sorted(first) if getattr(stmt, "is_insert", False) else None
    return prepare(stmt, dialect, keys)


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
    names = _server_names(conn) if prepared.server is not None else None
    if names is not None:
        # PostgreSQL: as a script of one statement, prepared on the session (below).
        return _simple_query(conn, [(stmt, many if many is not None else one)], names)[0]
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


# The engine's option (``execution_options``) that turns the scripts' prepared statements
# on (the default) or off; and, per driver connection, the names it has prepared so far.
SERVER_PREPARE = "corral_server_prepare"
_on_server: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
# Errors after which a session's prepared statements cannot be trusted: "prepared
# statement does not exist" (the session lost them) and "cached plan must not change
# result type" (a column a statement returns changed type: a migration).
_STALE_STATEMENTS = frozenset({"26000", "0A000"})


def script(
    conn: Connection,
    statements: Sequence[Statement],
    *,
    begin: bool = False,
    commit: bool = False,
) -> list[Rows]:
    """Run ``statements`` in order on ``conn``; the rows of each (empty for a write).

    On PostgreSQL they go to the server in one round trip: each is bound on the client
    (psycopg's own quoting, as :meth:`psycopg.ClientCursor.mogrify` binds: :class:`Binder`)
    and the lot is sent as one simple query, with ``BEGIN`` before and ``COMMIT`` after
    when asked. A simple query runs its statements in order, each with a fresh snapshot
    (so a read after a ``FOR UPDATE`` sees what the lock waited for), and without
    ``BEGIN``/``COMMIT`` as one implicit transaction: all or nothing. The connection must
    be in autocommit (:func:`app.store.db.connection_scope` with ``explicit=True``): the script,
    not the driver, opens and ends the transaction. A list of parameter sets runs the
    statement once per set, an ``INSERT`` as one statement of many ``VALUES``.

    Each statement is prepared on the server session the first time the connection runs
    it (a ``PREPARE`` at the head of that script) and then sent as ``EXECUTE name(…)``
    with its values bound: the server parses and plans it once per connection, not on
    every call. ``PREPARE`` is not undone by a rollback; a script that prepared and failed
    invalidates its connection, so the names it may have left go with the session; a
    session that lost its statements (``prepared statement does not exist``), or whose
    statement returns a column that changed type (a migration), is dropped too. The
    engine option :data:`SERVER_PREPARE` false (``CORRAL_DATABASE_PREPARE``) sends every
    statement as its text.

    Elsewhere (SQLite: calls into this process, no round trips to save) each statement
    runs through :func:`execute`, and the connection's own transaction is the one.
    """
    if conn.dialect.name != "postgresql":
        return [execute(conn, stmt, params) for stmt, params in statements]
    return _simple_query(conn, statements, _server_names(conn), begin=begin, commit=commit)


def _server_names(conn: Connection) -> set[str] | None:
    """On PostgreSQL with :data:`SERVER_PREPARE` on, the names of the statements
    prepared on ``conn``'s session so far; otherwise ``None``."""
    if conn.dialect.name != "postgresql" or not conn.get_execution_options().get(
        SERVER_PREPARE, True
    ):
        return None
    driver = conn.connection.driver_connection
    names = _on_server.get(driver)
    if names is None:
        names = _on_server[driver] = set()
    return names


def _simple_query(
    conn: Connection,
    statements: Sequence[Statement],
    names: set[str] | None,
    *,
    begin: bool = False,
    commit: bool = False,
) -> list[Rows]:
    """:func:`script` on PostgreSQL; ``names``: :func:`_server_names` of ``conn``."""
    import psycopg  # the PostgreSQL driver: imported only where it is the dialect's

    dialect = conn.dialect
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    cursor = psycopg.ClientCursor(driver)
    query: Query | None = None
    try:
        query = Query.compose(dialect, Binder(cursor), statements, names, begin, commit)
        if query.text:
            cursor.execute(query.text)
        fetched = []
        for i, reader in enumerate(query.readers):
            if i:
                cursor.nextset()
            fetched.append(cursor.fetchall() if reader is not None else None)
        return query.collect(fetched, names)
    except dialect.loaded_dbapi.Error as exc:
        # Nothing was sent if the query could not be composed (a value psycopg refused).
        lost = query is not None and (
            bool(query.new) or getattr(exc, "sqlstate", None) in _STALE_STATEMENTS
        )
        raise _translated(conn, query.sql if query else "", None, exc, drop=lost) from exc
    finally:
        cursor.close()


async def script_async(
    aconn: Any,
    dialect: Dialect,
    statements: Sequence[Statement],
    names: set[str] | None,
    *,
    begin: bool = False,
    commit: bool = False,
) -> list[Rows]:
    """:func:`script` on a :class:`psycopg.AsyncConnection` in autocommit (the API's
    event loop, :mod:`app.loopdb`): the same query in one round trip, awaited instead of
    waited for. ``names``: the statements prepared on ``aconn``'s session so far, updated
    once the query ran. Errors are raised as SQLAlchemy's; the caller closes ``aconn``
    after any (its session's state is unknown)."""
    import psycopg

    cursor = psycopg.AsyncClientCursor(aconn)
    query: Query | None = None
    try:
        query = Query.compose(dialect, Binder(cursor), statements, names, begin, commit)
        if query.text:
            await cursor.execute(query.text)
        fetched = []
        for i, reader in enumerate(query.readers):
            if i:
                cursor.nextset()
            fetched.append(await cursor.fetchall() if reader is not None else None)
        return query.collect(fetched, names)
    except psycopg.Error as exc:
        raise DBAPIError.instance(
            query.sql if query else "",
            None,
            exc,
            psycopg.Error,
            connection_invalidated=aconn.closed or aconn.broken,  # the dialect's test
            dialect=dialect,
        ) from exc
    finally:
        await cursor.close()


@dataclass(slots=True)
class Query:
    """A script as the one simple query that runs it on PostgreSQL."""

    text: str  # the statements bound, ``; ``-joined, the PREPAREs first
    # For each statement of the text, the index (in the script) of the statement whose
    # rows it returns, and its Prepared; None for a statement that returns none.
    readers: list[tuple[int, Prepared] | None]
    new: list[str]  # the names this text prepares on the session
    sql: str  # the statements unbound, for an error: no values in a message
    count: int  # statements in the script

    def collect(
        self, fetched: Sequence[Sequence[Any] | None], names: set[str] | None
    ) -> list[Rows]:
        """Each statement's rows from what each statement of the text returned (None for
        one that returns none); ``names`` (the session's prepared statements) gains the
        ones this text prepared."""
        if names is not None:
            names.update(self.new)
        out = [Rows() for _ in range(self.count)]
        for reader, raw in zip(self.readers, fetched, strict=True):
            if reader is not None and raw is not None:
                out[reader[0]].extend(reader[1].rows(raw))
        return out

    @classmethod
    def compose(
        cls,
        dialect: Dialect,
        binder: Binder,
        statements: Sequence[Statement],
        names: set[str] | None,
        begin: bool,
        commit: bool,
    ) -> Query:
        """Bind ``statements`` with ``binder`` (a client cursor's) into one query; a
        statement not prepared on the session yet (``names``; None: preparing is off) gets
        its ``PREPARE`` at the head."""
        prepares: list[str] = []
        new: list[str] = []
        parts: list[str] = ["BEGIN"] if begin else []
        readers: list[tuple[int, Prepared] | None] = [None] * len(parts)
        sql: list[str] = []
        for index, (stmt, params) in enumerate(statements):
            many: list[Params] = list(params) if isinstance(params, list) else [params]  # type: ignore[list-item]
            if not many:
                continue
            found = _prepared(dialect, stmt, many[0])
            if not found.supported:
                raise ValueError(f"not a statement a script can run: {found.sql}")
            if len(many) > 1 and getattr(stmt, "is_insert", False) and not found.returns:
                # Many rows: one INSERT of many VALUES, as its text (its length varies).
                bound = [binder.mogrify(found.sql, found.parameters(p)) for p in many]
                head = found.sql[: found.sql.index(" VALUES ") + len(" VALUES ")]
                bound = [head + ", ".join(b[len(head) :] for b in bound)]
            elif names is not None and found.server is not None:
                form = found.server
                if form.name not in names and form.name not in new:
                    prepares.append(form.prepare)
                    new.append(form.name)
                bound = [binder.call(form, found.parameters(p)) for p in many]
            else:
                bound = [binder.mogrify(found.sql, found.parameters(p)) for p in many]
            parts.extend(bound)
            sql.append(found.sql)
            readers.extend([(index, found) if found.returns else None] * len(bound))
        if commit:
            parts.append("COMMIT")
            readers.append(None)
        parts[:0] = prepares
        readers[:0] = [None] * len(prepares)
        return cls("; ".join(parts), readers, new, "; ".join(sql), len(statements))


def _translated(
    conn: Connection, sql: str, params: Any, exc: Any, *, drop: bool = False
) -> BaseException:
    """The driver's error as SQLAlchemy raises it; a lost connection is invalidated, and
    with it every connection the pool handed out before (as ``Connection.execute`` does).
    ``drop``: this connection alone is invalidated (its session's state is unknown)."""
    dialect = conn.dialect
    disconnect = dialect.is_disconnect(exc, conn.connection.dbapi_connection, None)
    if drop and not disconnect:
        conn.invalidate(exc)
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
