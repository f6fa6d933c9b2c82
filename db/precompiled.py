"""Hot statements, run from SQL compiled once instead of from the statement object.

`connection.execute(statement)` computes the statement's cache key on every call, walking its
whole tree, and rebuilds the parameter dictionary through the compiled form: for the place
statement (thirty parameters) that was more CPU than psycopg2's own work. `execute` below compiles
a statement once per dialect and runs the SQL string on the driver's cursor (see below) or
through `exec_driver_sql`; either way SQLAlchemy's `before_cursor_execute` listeners (the
statement-timeout prefix of db.engine), error wrapping and disconnect handling still apply. What
SQLAlchemy would still do per call is kept: literal values of the statement are filled in, and
the bind processors of the parameters' types (UTC datetimes, arrays) run.

Only for statements built once and kept (the callers' `lru_cache`d builders): the cache is keyed,
weakly, by the statement object.

Both databases: psycopg2 takes the parameters by name, sqlite3 (qmark style) as a tuple in the
order of the SQL's placeholders. Two kinds of statement run the usual way instead, from the same
call: one with an expanding parameter (an `IN` list, which SQLAlchemy rewrites per call), and,
outside a transaction, one whose result has columns that only SQLAlchemy's processing turns into
values (SQLite returns dates as text; a UTC time is made UTC): `exec_driver_sql` there would hand
back the driver's own values.

On PostgreSQL a caller may also ask for the statement prepared on the connection (`prepare=True`,
see `_run_prepared`): the per-order statements, which PostgreSQL otherwise parses and plans anew
each time. The dispatcher's claims stay unprepared: a generic plan of a claim (its LIMIT, the
backlog it reads) is not one to trust without measuring.

Inside a transaction, a statement goes to the driver's cursor directly, prepared or not, its
result columns through the result processors of their types as SQLAlchemy would run them: through
`Session.run` when the caller holds a unit of work's `db.driver.Session` (no SQLAlchemy
`Connection` is built for the transaction at all), through `_on_driver` when it holds a
SQLAlchemy `Connection` (direct callers).
"""

from __future__ import annotations

import itertools
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, Dialect, exc
from sqlalchemy.sql import ClauseElement

from db.backend import backend_of
from db.driver import ResultProcessors, Rows, Session, on_cursor

__all__ = ["Result", "Rows", "Scalars", "Session", "execute", "parameters_for", "precompile"]


@dataclass(frozen=True)
class Prepared:
    """A statement as PostgreSQL prepares it: `$n` placeholders, the parameters' types, and their
    names in `$n` order; `number` names it on a connection."""

    number: int
    sql: str
    types: str  # "(varchar, integer[], ...)", or "" without parameters
    names: tuple[str, ...]
    arguments: str  # "(%s, %s, ...)": the EXECUTE's, filled by the driver


@dataclass(frozen=True)
class Precompiled:
    sql: str
    defaults: Mapping[str, Any]  # the statement's own literal values, by parameter name
    processors: Mapping[str, Callable[[Any], Any]]  # bind processors of the parameters' types
    positions: tuple[str, ...] | None  # parameter names in placeholder order (qmark style), else None
    prepared: Prepared | None = None  # where the backend prepares statements (PostgreSQL)
    # Per result column, in order, the result processor of its type (None: the driver's value
    # stands); None if no column has one.
    results: ResultProcessors = None


class Scalars(Protocol):
    def __iter__(self) -> Iterator[Any]: ...

    def all(self) -> Sequence[Any]: ...


class Result(Protocol):
    """What callers read of a result: SQLAlchemy's `CursorResult`, or `Rows`."""

    @property
    def rowcount(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...

    def all(self) -> Sequence[Any]: ...

    def first(self) -> Any: ...

    def one(self) -> Any: ...

    def scalars(self) -> Scalars: ...


# Weakly keyed: a statement its builder's cache lets go of (say, the place statement of a rare
# item count) takes its compiled form with it, so no sequence of calls grows this without end.
_compiled: weakref.WeakKeyDictionary[ClauseElement, dict[str, Precompiled | None]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def precompile(statement: ClauseElement, dialect: Dialect) -> Precompiled | None:
    """The statement's SQL and how to make its parameters, compiled once; None if it must run the
    usual way on this dialect (see the module's docstring)."""
    known = _compiled.get(statement, {})
    if dialect.name in known:
        return known[dialect.name]
    found = _compile(statement, dialect)
    with _lock:
        _compiled.setdefault(statement, {})[dialect.name] = found
    return found


def _compile(statement: ClauseElement, dialect: Dialect) -> Precompiled | None:
    compiled: Any = statement.compile(dialect=dialect)
    per_column = tuple(
        column.type.dialect_impl(dialect).result_processor(dialect, None)
        for column in compiled._result_columns
    )
    results = per_column if any(processor is not None for processor in per_column) else None
    defaults: dict[str, Any] = {}
    processors: dict[str, Callable[[Any], Any]] = {}
    for bind, name in compiled.bind_names.items():
        if bind.expanding:
            return None
        if not bind.required:
            defaults[name] = bind.effective_value
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors[name] = processor
    positions: tuple[str, ...] | None = None
    if compiled.positional:
        if dialect.paramstyle != "qmark":
            raise ValueError(f"paramstyle {dialect.paramstyle}: only named styles and qmark are precompiled")
        positions = tuple(compiled.positiontup)
    prepared = None
    if backend_of(dialect.name).prepares:
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        prepared = _prepared(compiled.string, binds, dialect)
    return Precompiled(compiled.string, defaults, processors, positions, prepared, results)


_PYFORMAT = re.compile(r"%\((\w+)\)s")
_numbers = itertools.count(1)


def _prepared(sql: str, binds: Mapping[str, Any], dialect: Dialect) -> Prepared:
    """`sql` (pyformat, psycopg2's) with `$n` in place of each named parameter, first come first
    numbered; each parameter declared with its SQLAlchemy type, so that an array or a time is what
    the statement meant whatever the value's literal looks like."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    numbered = _PYFORMAT.sub(number, sql)
    types = [_type_name(binds[name], dialect) for name in names]
    return Prepared(
        number=next(_numbers),
        sql=numbered,
        types=f"({', '.join(types)})" if types else "",
        names=tuple(names),
        arguments=f"({', '.join(['%s'] * len(names))})" if names else "",
    )


def _type_name(bind: Any, dialect: Dialect) -> str:
    try:
        return str(bind.type.compile(dialect=dialect))
    except exc.CompileError:  # a type with no SQL name (NullType): PostgreSQL infers it from the statement
        return "unknown"


def parameters_for(
    precompiled: Precompiled, parameters: Mapping[str, Any]
) -> dict[str, Any] | tuple[Any, ...]:
    """The DBAPI parameters: the statement's literals, the caller's values, each processed; a
    tuple in placeholder order where the driver takes them by position."""
    values = {**precompiled.defaults, **parameters}
    for name, processor in precompiled.processors.items():
        if name in values:
            values[name] = processor(values[name])
    if precompiled.positions is None:
        return values
    return tuple(values[name] for name in precompiled.positions)


def execute(
    connection: Connection | Session,
    statement: ClauseElement,
    parameters: Mapping[str, Any],
    prepare: bool = False,
) -> Result:
    """`connection.execute(statement, parameters)`, from the SQL compiled once; with `prepare`, as a
    statement prepared on the connection where the backend prepares them (see `_run_prepared`).
    On a unit of work's `Session` (`db.driver`) the statement runs on the driver's cursor, its
    result columns processed as SQLAlchemy would (`Precompiled.results`)."""
    precompiled = precompile(statement, connection.dialect)
    if precompiled is None or (precompiled.results is not None and _outside_transaction(connection)):
        # Outside a transaction only SQLAlchemy's execution would begin one, and the driver's own
        # rows are not what the result's types make of them (SQLite's dates are text).
        return connection.execute(statement, parameters)  # type: ignore[call-overload]
    values = parameters_for(precompiled, parameters)
    if prepare and precompiled.prepared is not None and isinstance(values, dict):
        return _run_prepared(connection, precompiled.prepared, values, precompiled.results)
    return _runner(connection, precompiled.results)(precompiled.sql, values)


def _outside_transaction(connection: Connection | Session) -> bool:
    return isinstance(connection, Connection) and not connection.in_transaction()


def _runner(connection: Connection | Session, results: ResultProcessors) -> Callable[[str, Any], Result]:
    """How a precompiled statement's SQL is sent on `connection`, its result columns processed."""
    if isinstance(connection, Session):
        return lambda sql, values: connection.run(sql, values, results)
    return lambda sql, values: _on_driver(connection, sql, values, results)


_PREPARED = "orders_prepared"  # on the pooled connection's info: {Prepared.number: name}
_ATTEMPTS = "orders_prepare_attempts"


def _run_prepared(
    connection: Connection | Session, prepared: Prepared, values: Mapping[str, Any], results: ResultProcessors
) -> Result:
    """EXECUTE the statement prepared on this connection, or PREPARE it first in the same query
    string. PostgreSQL then parses and plans it once per connection, not on every call: for the
    per-order statements (a few CTEs each) the larger part of its CPU per statement
    (docs/performance.md, "Fourth round").

    A name is kept (on the pooled connection's `info`, which a new connection starts empty) only
    once its PREPARE has run: after a failure the next try prepares under a new name, since it is
    not known whether the PREPARE ran before the error (a prepared statement outlives a rollback).
    Statements prepared by a pooler's other sessions are never seen: transaction-mode poolers are
    not supported (docs/operations.md, "Sizing")."""
    arguments = tuple(values[name] for name in prepared.names)
    run = _runner(connection, results)
    info = connection.info if isinstance(connection, Session) else connection.connection.info
    names: dict[int, str] = info.setdefault(_PREPARED, {})
    name = names.get(prepared.number)
    if name is not None:
        return run(f"EXECUTE {name} {prepared.arguments}", arguments)
    attempt = info[_ATTEMPTS] = info.get(_ATTEMPTS, 0) + 1
    name = f"orders_{prepared.number}_{attempt}"
    result = run(
        f"PREPARE {name} {prepared.types} AS {prepared.sql}; EXECUTE {name} {prepared.arguments}",
        arguments,
    )
    names[prepared.number] = name
    return result


def _on_driver(
    connection: Connection,
    sql: str,
    arguments: Mapping[str, Any] | tuple[Any, ...],
    results: ResultProcessors = None,
) -> Result:
    """`sql` on the driver's cursor, without SQLAlchemy's execution around it (a context, a
    `CursorResult` and its row metadata, which cost about as much CPU as psycopg2's own work for an
    EXECUTE: docs/performance.md, "Fifth round"), but with what of it the service relies on
    (`db.driver.on_cursor`): every `before_cursor_execute` listener (the statement-timeout and
    BEGIN prefix of db.engine), SQLAlchemy's handling of driver errors, and each result column
    through its type's result processor (`results`). Outside a transaction SQLAlchemy's execution
    runs, since only it would begin one (autobegin)."""
    if not connection.in_transaction():
        return connection.exec_driver_sql(sql, arguments)
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    listeners = list(connection.dispatch.before_cursor_execute)
    return on_cursor(cursor, sql, arguments, results, listeners, lambda: connection)
