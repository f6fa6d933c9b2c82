"""A transaction's statements on the pooled driver connection, and the rows read off it.

A unit of work (`db.unit_of_work`) checks a DBAPI connection out of the pool (psycopg2's or
sqlite3's) and hands its repositories a `Session` on it instead of a SQLAlchemy `Connection`.
The hot statements (`db.precompiled`, compiled once) run on the driver's cursor through
`Session.run`, their result columns through the processors SQLAlchemy would run; a statement
built per call opens a SQLAlchemy `Connection` on the same DBAPI connection, in the same
transaction, on first use.

Why: SQLAlchemy's `Connection` around a transaction (its construction, its begin and commit, the
execution options that carry the statement prefix, its close) and its event dispatch cost about
as much CPU as psycopg2's own work for a one-statement write (docs/performance.md, "Sixth round").
A place or saga transaction that runs only precompiled statements now never builds one. On SQLite
the same held, measured whole at the server (docs/performance.md, "Eighth round").

What the service relies on from SQLAlchemy's execution is kept on this path:
- the statement prefix (BEGIN, the deadline's `SET LOCAL statement_timeout`) goes in front of the
  first statement, whichever path sends it (`db.engine.prefix_next_statement` on the other);
- the engine's other `before_cursor_execute` listeners (tests, instrumentation) run, given the
  SQLAlchemy `Connection`, opened for them;
- a driver error goes through SQLAlchemy's handling (`Connection._handle_dbapi_exception`): it
  is wrapped as `DBAPIError` for `db.errors.translate`, and a disconnect invalidates the
  connection and the pool's older connections.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, exc
from sqlalchemy.pool import PoolProxiedConnection

from db.engine import with_prefix

# A statement's result processors (SQLAlchemy's, of its columns' types), one per result column in
# order, None where the driver's value stands; None for a statement none of whose columns has one.
ResultProcessors = tuple[Callable[[Any], Any] | None, ...] | None


@lru_cache(maxsize=64)
def _row_type(names: tuple[str, ...]) -> Any:
    """Rows read by column name or position, as SQLAlchemy's `Row`."""
    return namedtuple("Row", names, rename=True)


class Rows:
    """A statement's rows as read off the driver's cursor: the part of `CursorResult` callers use."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rowcount: int, rows: list[Any]) -> None:
        self.rowcount = rowcount
        self._rows = rows

    @classmethod
    def read(cls, cursor: Any, processors: ResultProcessors = None) -> Rows:
        """What the executed statement answered, read whole (these statements answer a few rows),
        each column through its processor if it has one (`ResultProcessors`)."""
        if not cursor.description:
            return cls(cursor.rowcount, [])
        row = _row_type(tuple(column[0] for column in cursor.description))._make
        fetched = cursor.fetchall()
        if processors is None:
            return cls(cursor.rowcount, [row(values) for values in fetched])
        processed = [
            row([value if process is None else process(value) for process, value in pairs])
            for pairs in (zip(processors, values, strict=True) for values in fetched)
        ]
        return cls(cursor.rowcount, processed)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return list(self._rows)

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            if not self._rows:
                raise exc.NoResultFound("No row was found when one was required")
            raise exc.MultipleResultsFound("Multiple rows were found when exactly one was required")
        return self._rows[0]

    def scalars(self) -> Values:
        return Values(row[0] for row in self._rows)


class Values(list[Any]):
    """A column's values, as `ScalarResult` gives them."""

    def all(self) -> list[Any]:
        return list(self)


class Session:
    """One transaction's statements on a pooled driver connection (see the module's docstring).

    Owned by its unit of work, which sends COMMIT or ROLLBACK and returns the connection to the
    pool; `opened` is the SQLAlchemy `Connection` if one was needed, for the unit of work to end
    and close in its stead."""

    __slots__ = ("_open", "_prefix", "dialect", "engine", "opened", "pooled")

    def __init__(
        self,
        engine: Engine,
        pooled: PoolProxiedConnection,
        prefix: str,
        open_connection: Callable[[Session], Connection],
    ) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self.pooled = pooled
        self.opened: Connection | None = None
        self._prefix = prefix  # "BEGIN; SET LOCAL ...", sent in front of the first statement
        self._open = open_connection

    @property
    def info(self) -> dict[Any, Any]:
        """The pooled connection's own dictionary (it lives as long as the DBAPI connection)."""
        return self.pooled.info

    def take_prefix(self) -> str:
        """The prefix still to send, once: the first statement sent, by either path, takes it."""
        prefix, self._prefix = self._prefix, ""
        return prefix

    def sqlalchemy(self) -> Connection:
        """A SQLAlchemy `Connection` on this session's connection and transaction (opened once)."""
        if self.opened is None:
            self.opened = self._open(self)
        return self.opened

    def execute(self, statement: Any, parameters: Any = None) -> CursorResult[Any]:
        return self.sqlalchemy().execute(statement, parameters)

    def exec_driver_sql(self, sql: str, parameters: Any = None) -> CursorResult[Any]:
        return self.sqlalchemy().exec_driver_sql(sql, parameters)

    def run(
        self, sql: str, arguments: Mapping[str, Any] | Sequence[Any], processors: ResultProcessors = None
    ) -> Rows:
        """`sql` on the driver's cursor, the prefix in front if it is still to be sent; the result
        columns through `processors` (`Rows.read`)."""
        prefix = self._prefix
        if prefix:
            self._prefix = ""
            sql = f"{prefix}; {sql}"
        dbapi = self.pooled.dbapi_connection
        if dbapi is None:  # invalidated by an earlier error of this transaction
            raise exc.ResourceClosedError("this transaction's connection was invalidated")
        dispatch = self.engine.dispatch.before_cursor_execute
        listeners = [listener for listener in dispatch if listener is not with_prefix]
        return on_cursor(dbapi.cursor(), sql, arguments, processors, listeners, self.sqlalchemy)


def on_cursor(
    cursor: Any,
    sql: str,
    arguments: Any,
    processors: ResultProcessors,
    listeners: Sequence[Callable[..., tuple[str, Any]]],
    connection: Callable[[], Connection],
) -> Rows:
    """`sql` on `cursor` (closed after), its rows read whole. What the service relies on from
    SQLAlchemy's execution is kept: the `before_cursor_execute` `listeners` run first, given the
    SQLAlchemy `Connection` (`connection()`, asked for only if there are listeners or an error),
    and a driver error goes through that connection's handling (`_handle_dbapi_exception`), which
    wraps it as `DBAPIError`, for `db.errors.translate`, and invalidates the connection (and the
    pool) on a disconnect."""
    try:
        if listeners:
            bound = connection()
            for listener in listeners:
                sql, arguments = listener(bound, cursor, sql, arguments, None, False)
        cursor.execute(sql, arguments)
        return Rows.read(cursor, processors)
    except Exception as error:
        connection()._handle_dbapi_exception(error, sql, arguments, cursor, None)
        raise  # not reached: the handler raises
    finally:
        cursor.close()


# What a repository runs its statements on: a unit of work's `Session`, or SQLAlchemy's `Connection`
# wherever a caller holds one.
Statements = Connection | Session
