"""The one seam between the two databases: what differs between PostgreSQL and SQLite, decided
once from the engine's dialect. Code outside `db/` asks a `Backend` what it can do (`notifies`,
`embedded`), never which database it is on.

- PostgreSQL: many processes share it; `LISTEN/NOTIFY` wakes them; data-modifying `WITH` lets a
  hot path write several tables in one statement; the server's `now()` is the clock of leases
  (`db.clock`); the planner needs statistics, which autovacuum or the housekeeper keeps.
- SQLite: embedded, one process owns the file (one writer at a time, `db.engine.WriterGate`), so
  migrations may run at start; no notifications; each hot path is a few plain statements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Dialect, Table
from sqlalchemy.dialects import postgresql, sqlite


@dataclass(frozen=True)
class Backend:
    name: str  # for logs and the ready line only; capabilities below are what code asks
    embedded: bool  # one process owns the database: no peers, migrations at start are safe
    notifies: bool  # LISTEN/NOTIFY between processes
    one_statement_writes: bool  # data-modifying WITH, array parameters: hot paths in one statement
    keeps_statistics: bool  # planner statistics matter (ANALYZE when autovacuum is off)
    upsert: Callable[[Table], Any]  # INSERT ... ON CONFLICT for this dialect
    prepares: bool  # server-side prepared statements (PREPARE / EXECUTE), db.precompiled

    @property
    def database_clock(self) -> bool:
        """Times that decide leases are the database's own (`now()`), not this process's."""
        return not self.embedded


POSTGRESQL = Backend(
    name="postgresql",
    embedded=False,
    notifies=True,
    one_statement_writes=True,
    keeps_statistics=True,
    upsert=postgresql.insert,
    prepares=True,
)
SQLITE = Backend(
    name="sqlite",
    embedded=True,
    notifies=False,
    one_statement_writes=False,
    keeps_statistics=False,
    upsert=sqlite.insert,
    prepares=False,  # sqlite3 keeps its own cache of prepared statements per connection
)
_BY_DIALECT = {backend.name: backend for backend in (POSTGRESQL, SQLITE)}


class Bound(Protocol):
    """An engine, a connection, or a unit of work's `db.driver.Session`: bound to one dialect."""

    @property
    def dialect(self) -> Dialect: ...


def backend_of(bind: Bound | str) -> Backend:
    """The backend of an engine, a connection, or a dialect name (`db.engine` refuses others)."""
    name = bind if isinstance(bind, str) else bind.dialect.name
    return _BY_DIALECT[name]
