"""The database's clock in SQL: what decides lease expiry and due times.

On PostgreSQL every outbox time that decides who may run an event (`available_at`, `locked_until`,
and the `created_at` a saga's age counts from) is written and compared with the server's `now()`,
never a process's clock: instances whose clocks disagree still agree on whose lease has run out.
`now()` is the start of the transaction, which for the dispatcher's single-statement rounds is the
statement's own start.

SQLite is embedded: the database has no clock but that of the process that opened it (one
process, see DESIGN.md), so there the same statements take the process's time as parameters.

A statement built with `now(dialect)` and `later(dialect, name)` takes the parameters that
`parameters(at, name=seconds, ...)` makes, which serve both: PostgreSQL reads the seconds, SQLite
the times.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Float, bindparam, func

from db.backend import backend_of
from db.tables import UTCDateTime

NOW = "now"


def now(dialect: str) -> ColumnElement[Any]:
    """The database's current time: `now()` on PostgreSQL, the parameter `now` on SQLite."""
    if backend_of(dialect).database_clock:
        return func.now()
    return bindparam(NOW, type_=UTCDateTime())


def later(dialect: str, seconds: str) -> ColumnElement[Any]:
    """`now(dialect)` plus the parameter `seconds` (a float) on PostgreSQL; on SQLite the parameter
    `seconds`_at, the time that makes (see `parameters`)."""
    if backend_of(dialect).database_clock:
        return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, bindparam(seconds, type_=Float))
    return bindparam(f"{seconds}_at", type_=UTCDateTime())


def parameters(at: datetime, **seconds: float) -> dict[str, Any]:
    """The parameters of a statement built with `now` and `later`, for either database: the process
    time `at` and each offset in seconds, and on SQLite's behalf the times they make."""
    values: dict[str, Any] = {NOW: at}
    for name, offset in seconds.items():
        values[name] = offset
        values[f"{name}_at"] = at + timedelta(seconds=offset)
    return values
