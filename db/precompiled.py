"""Hot statements on PostgreSQL, run from SQL compiled once instead of from the statement object.

`connection.execute(statement)` computes the statement's cache key on every call, walking its
whole tree, and rebuilds the parameter dictionary through the compiled form: for the place
statement (thirty parameters) that was more CPU than psycopg2's own work. `execute` below compiles
a statement once per dialect and runs the SQL string through `exec_driver_sql`, so SQLAlchemy's
events (the statement-timeout prefix of db.engine), error wrapping and disconnect handling all
still apply. What SQLAlchemy would still do per call is kept: literal values of the statement
are filled in, and the bind processors of the parameters' types (UTC datetimes, arrays) run.

Only for statements built once and kept (the callers' `lru_cache`d builders): the cache is keyed,
weakly, by the statement object. SQLite runs statements the usual way (its parameters need SQLAlchemy's
processing of dates, and its statements are not the bottleneck there).
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


# Weakly keyed: a statement its builder's cache lets go of (say, the place statement of a rare
# item count) takes its compiled form with it, so no sequence of calls grows this without end.
_compiled: weakref.WeakKeyDictionary[ClauseElement, dict[str, Precompiled]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def precompile(statement: ClauseElement, dialect: Dialect) -> Precompiled:
    found = _compiled.get(statement, {}).get(dialect.name)
    if found is not None:
        return found
    compiled = statement.compile(dialect=dialect)
    defaults: dict[str, Any] = {}
    processors: dict[str, Callable[[Any], Any]] = {}
    for bind, name in compiled.bind_names.items():  # type: ignore[attr-defined]
        if bind.expanding:
            raise ValueError(f"{name}: expanding parameters are rewritten per call; not precompilable")
        if not bind.required:
            defaults[name] = bind.effective_value
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors[name] = processor
    found = Precompiled(compiled.string, defaults, processors)
    with _lock:
        _compiled.setdefault(statement, {})[dialect.name] = found
    return found


def parameters_for(precompiled: Precompiled, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The DBAPI parameters: the statement's literals, the caller's values, each processed."""
    values = {**precompiled.defaults, **parameters}
    for name, processor in precompiled.processors.items():
        if name in values:
            values[name] = processor(values[name])
    return values


def execute(
    connection: Connection, statement: ClauseElement, parameters: Mapping[str, Any]
) -> CursorResult[Any]:
    """`connection.execute(statement, parameters)`, from the SQL compiled once on PostgreSQL."""
    if not backend_of(connection).one_statement_writes:
        return connection.execute(statement, parameters)  # type: ignore[call-overload,no-any-return]
    precompiled = precompile(statement, connection.dialect)
    return connection.exec_driver_sql(precompiled.sql, parameters_for(precompiled, parameters))
