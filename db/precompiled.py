"""Hot statements, run from SQL compiled once instead of from the statement object.

`connection.execute(statement)` computes the statement's cache key on every call, walking its
whole tree, and rebuilds the parameter dictionary through the compiled form: for the place
statement (thirty parameters) that was more CPU than psycopg2's own work. `execute` below compiles
a statement once per dialect and runs the SQL string through `exec_driver_sql`, so SQLAlchemy's
events (the statement-timeout prefix of db.engine), error wrapping and disconnect handling all
still apply. What SQLAlchemy would still do per call is kept: literal values of the statement
are filled in, and the bind processors of the parameters' types (UTC datetimes, arrays) run.

Only for statements built once and kept (the callers' `lru_cache`d builders): the cache is keyed,
weakly, by the statement object.

Both databases: psycopg2 takes the parameters by name, sqlite3 (qmark style) as a tuple in the
order of the SQL's placeholders. Two kinds of statement run the usual way instead, from the same
call: one with an expanding parameter (an `IN` list, which SQLAlchemy rewrites per call), and on a
backend whose driver does not type its results (`Backend.typed_results`: SQLite returns dates as
text) one whose result has columns that only SQLAlchemy's processing would turn back into values.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, CursorResult, Dialect
from sqlalchemy.sql import ClauseElement

from db.backend import backend_of


@dataclass(frozen=True)
class Precompiled:
    sql: str
    defaults: Mapping[str, Any]  # the statement's own literal values, by parameter name
    processors: Mapping[str, Callable[[Any], Any]]  # bind processors of the parameters' types
    positions: tuple[str, ...] | None  # parameter names in placeholder order (qmark style), else None


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
    if not backend_of(dialect.name).typed_results and any(
        column.type.dialect_impl(dialect).result_processor(dialect, None) is not None
        for column in compiled._result_columns
    ):
        return None
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
    return Precompiled(compiled.string, defaults, processors, positions)


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
    connection: Connection, statement: ClauseElement, parameters: Mapping[str, Any]
) -> CursorResult[Any]:
    """`connection.execute(statement, parameters)`, from the SQL compiled once."""
    precompiled = precompile(statement, connection.dialect)
    if precompiled is None:
        return connection.execute(statement, parameters)  # type: ignore[call-overload,no-any-return]
    return connection.exec_driver_sql(precompiled.sql, parameters_for(precompiled, parameters))
