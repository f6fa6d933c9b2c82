"""Engines per backend: SQLite (WAL, busy timeout, foreign keys, BEGIN IMMEDIATE for writers) and
PostgreSQL (sized pool, a ping for connections that sat idle, server-side timeouts)."""

from __future__ import annotations

import select
import sqlite3
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from db.backend import backend_of
from domain.deadline import remaining_ms


class UnsupportedDatabaseError(ValueError):
    pass


@dataclass(frozen=True)
class EngineSettings:
    pool_size: int = 10
    max_overflow: int = 5
    pool_timeout_s: float = 10.0
    statement_timeout_ms: int = 10_000
    idle_in_transaction_timeout_ms: int = 30_000
    sqlite_busy_timeout_ms: int = 10_000
    connect_timeout_s: int = 5
    ping_after_idle_s: float = 1.0


def normalise_url(raw: str) -> URL:
    """Accept plain `postgresql://` (and `postgres://`) as psycopg2; refuse other backends clearly."""
    try:
        url = make_url(raw)
    except Exception as exc:
        # The raw value is not echoed: it may hold a password.
        raise UnsupportedDatabaseError(
            "not a database URL (expected e.g. postgresql://user@host:5432/db or sqlite:///path/orders.db)"
        ) from exc
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")
    if url.drivername not in ("postgresql+psycopg2", "sqlite", "sqlite+pysqlite"):
        raise UnsupportedDatabaseError(
            f"unsupported database {url.drivername!r}: use postgresql+psycopg2:// or sqlite:///"
        )
    if url.drivername.startswith("sqlite") and url.database in (None, "", ":memory:"):
        raise UnsupportedDatabaseError("SQLite needs a file (an in-memory database is private to one thread)")
    return url


def is_sqlite(engine: Engine) -> bool:
    """The embedded database, whose driver this module configures (pragmas, BEGIN IMMEDIATE)."""
    return backend_of(engine).embedded


def make_engine(raw_url: str, settings: EngineSettings | None = None) -> Engine:
    settings = settings or EngineSettings()
    url = normalise_url(raw_url)
    if url.drivername.startswith("sqlite"):
        return _sqlite_engine(url, settings)
    _install_wait_callback(settings)
    options = (
        f"-c statement_timeout={settings.statement_timeout_ms} "
        f"-c idle_in_transaction_session_timeout={settings.idle_in_transaction_timeout_ms}"
    )
    engine = create_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout_s,
        pool_recycle=1800,
        connect_args={"options": options, "connect_timeout": settings.connect_timeout_s},
    )
    _ping_when_idle(engine, settings.ping_after_idle_s)
    event.listen(engine, "before_cursor_execute", with_prefix, retval=True)
    return engine


_PREFIX = "orders_statement_prefix"


def prefix_next_statement(connection: Connection, sql: str) -> None:
    """Send `sql` (a SET LOCAL, say) in front of the next statement on this PostgreSQL connection,
    in the same query string, instead of as a round trip of its own. It is kept on this Connection
    object, so nothing of it outlives the checkout."""
    connection.execution_options(**{_PREFIX: [sql + "; "]})


def with_prefix(
    conn: Connection, _cursor: Any, statement: str, parameters: Any, _context: Any, _executemany: bool
) -> tuple[str, Any]:
    """The engine's `before_cursor_execute` listener that sends `prefix_next_statement`'s SQL."""
    pending = conn.get_execution_options().get(_PREFIX)
    return (pending.pop() + statement if pending else statement), parameters


_IDLE_SINCE = "orders_idle_since"


def _ping_when_idle(engine: Engine, after_s: float) -> None:
    """Ping a pooled connection at checkout only if it sat idle for `after_s` seconds.

    SQLAlchemy's `pool_pre_ping` pings on every checkout: one round trip more for every
    transaction, a quarter of the saga's time under load. A connection that was used a moment ago
    is alive as far as a ping could tell; if the database went away since, the statement fails,
    the call gets UNAVAILABLE and SQLAlchemy recycles the whole pool (a disconnect invalidates every
    connection older than it), so one failure per process replaces one round trip per transaction.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is None or time.monotonic() - idle_since < after_s:
            return  # new, or used a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            # The pool discards this connection and checks out (or opens) another.
            raise exc.DisconnectionError(f"pooled connection is dead: {error}") from error


class WriterGate:
    """One writer at a time in this process, queued here instead of in SQLite's busy handler.

    SQLite lets one connection write. A writer that finds the lock taken sleeps in SQLite's busy
    handler (1, 2, 5, 10 ... 100 ms between tries), so under concurrent writes the lock sat free
    while its waiters slept: throughput fell and the tail grew to most of a second. Writers of
    this process wait here instead and are woken the moment the previous one ends; other
    processes on the same file still meet SQLite's own busy timeout. Reentrant, so a thread that
    nests writers fails in SQLite as before rather than hanging here.

    The calls' writers pass a lock of their own first, so at the gate itself one of them at most
    meets the writers of background threads (`background_writer`: the saga and the outbox
    dispatcher). With every writer at the gate, the calls' threads outnumbered the saga's and took
    most turns: under a closed loop of PlaceOrder the sagas fell behind without bound (most orders
    still PENDING when the load stopped, docs/performance.md; past `--saga-timeout-s` an order
    fails).
    Now the saga finishes the work earlier commits made about as fast as new calls add more, and
    under overload the calls wait at the gate (and meet their deadlines there)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._gate = threading.RLock()
        self._calls = threading.RLock()  # the calls' writers, one of whom goes on to the gate

    def acquire(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the gate; False if it did not come free in time."""
        if getattr(_thread_role, "background", False):
            return self._gate.acquire(timeout=timeout_s)
        give_up = time.monotonic() + timeout_s
        if not self._calls.acquire(timeout=timeout_s):
            return False
        if self._gate.acquire(timeout=max(give_up - time.monotonic(), 0.0)):
            return True
        self._calls.release()
        return False

    def release(self) -> None:
        """After `acquire` returned True, on the same thread."""
        self._gate.release()
        if not getattr(_thread_role, "background", False):
            self._calls.release()


_thread_role = threading.local()


def background_writer() -> None:
    """Mark this thread's SQLite writes as background work: at the writer gate they meet one of the
    calls' writers at most, not all of them (see `WriterGate`). For the threads of the saga and
    the outbox dispatcher."""
    _thread_role.background = True


_WRITER_GATES: weakref.WeakKeyDictionary[Engine, WriterGate] = weakref.WeakKeyDictionary()


def writer_gate(engine: Engine) -> WriterGate | None:
    """The gate writers of this SQLite engine pass one at a time; None on PostgreSQL."""
    return _WRITER_GATES.get(engine)


def _sqlite_engine(url: URL, settings: EngineSettings) -> Engine:
    if url.database:
        Path(url.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout_s,
        connect_args={"check_same_thread": False, "timeout": settings.sqlite_busy_timeout_ms / 1000},
    )
    _WRITER_GATES[engine] = WriterGate(settings.sqlite_busy_timeout_ms / 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see the "begin" hook).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(settings.sqlite_busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        busy_ms = int(settings.sqlite_busy_timeout_ms)
        _record.info[_SQLITE_BUSY_MS] = _record.info[_SQLITE_DEFAULT_BUSY_MS] = busy_ms

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        pooled = conn.connection
        if pooled.dbapi_connection.in_transaction:
            return  # begun on the driver by a unit of work (`begin_sqlite`), which ends it too
        begin_sqlite(pooled, immediate=False)  # SQLAlchemy's own transactions: a reader's BEGIN

    return engine


def begin_sqlite(pooled: Any, immediate: bool) -> None:
    """BEGIN (IMMEDIATE for a writer) on a pooled sqlite3 connection of an engine of ours, sent on
    the driver's connection: SQLAlchemy's execution around a statement costs more CPU than SQLite's
    own work for it. A writer waits for SQLite's lock no longer than the caller's deadline allows:
    past it, the client has gone and the work must be abandoned, not done once the lock comes free.
    Errors reach the caller wrapped as SQLAlchemy's."""
    busy_ms = _sqlite_busy_timeout_ms(pooled.info[_SQLITE_DEFAULT_BUSY_MS])
    if pooled.info.get(_SQLITE_BUSY_MS) != busy_ms:
        sqlite_command(pooled.dbapi_connection, f"PRAGMA busy_timeout={busy_ms}")
        pooled.info[_SQLITE_BUSY_MS] = busy_ms
    sqlite_command(pooled.dbapi_connection, "BEGIN IMMEDIATE" if immediate else "BEGIN")


_SQLITE_BUSY_MS = "orders_sqlite_busy_timeout_ms"  # on the pooled connection's info: what it has now
_SQLITE_DEFAULT_BUSY_MS = "orders_sqlite_default_busy_timeout_ms"  # and the engine's setting


def sqlite_command(dbapi_connection: Any, command: str) -> None:
    """Run `command` on sqlite3's connection; its error as SQLAlchemy would have raised it."""
    try:
        dbapi_connection.execute(command).close()
    except sqlite3.Error as error:
        raise exc.DBAPIError.instance(command, None, error, sqlite3.Error) from error


def _sqlite_busy_timeout_ms(default_ms: int) -> int:
    """The busy timeout for a transaction starting now: the default, or less if a deadline is bound.

    A budget of a second or more is rounded down to a quarter second: every call's budget differs
    by a few milliseconds, and each new value cost a PRAGMA statement before the transaction."""
    budget = remaining_ms()
    if budget is None or budget >= default_ms:
        return int(default_ms)
    if budget >= 1000:
        budget -= budget % 250
    return max(1, budget)


# Slack past the caller's deadline before the client gives up by itself: on a database that
# answers, PostgreSQL's statement_timeout (set to the deadline by the unit of work) fires first.
_CLIENT_GRACE_S = 0.5


def _install_wait_callback(settings: EngineSettings) -> None:
    """Bound every psycopg2 wait of this process (connect, query, commit, pre-ping) on the client
    side: by the bound deadline (domain.deadline) plus a grace, else by connect_timeout for a
    connect and statement_timeout plus a grace for anything else. Without it, libpq waits forever
    on a pooled connection whose peer vanished without a reset (partition, dead host): the
    server-side statement_timeout never arrives and connect_timeout only covers new connections."""
    import psycopg2
    import psycopg2.extensions as ext

    from db.errors import GaveUpAtDeadline

    connect_s = float(settings.connect_timeout_s)
    other_s = settings.statement_timeout_ms / 1000 + 2.0

    def wait(conn: Any) -> None:
        budget_ms = remaining_ms()
        limit = connect_s if conn.status == ext.STATUS_SETUP else other_s
        give_up_error: type[psycopg2.OperationalError] = psycopg2.OperationalError
        if budget_ms is not None and budget_ms / 1000 + _CLIENT_GRACE_S < limit:
            # The same point in time for every wait of the call: its deadline plus the grace.
            limit = budget_ms / 1000 + _CLIENT_GRACE_S
            give_up_error = GaveUpAtDeadline
        give_up = time.monotonic() + limit
        while True:
            state = conn.poll()
            if state == ext.POLL_OK:
                return
            left = give_up - time.monotonic()
            if left <= 0:
                # psycopg2 closes a connection whose wait callback raised; SQLAlchemy sees it
                # closed, counts a disconnect and never returns it to the pool.
                raise give_up_error(f"database did not answer within {limit:.1f}s")
            if state == ext.POLL_READ:
                select.select([conn.fileno()], [], [], left)
            elif state == ext.POLL_WRITE:
                select.select([], [conn.fileno()], [], left)
            else:
                raise psycopg2.OperationalError(f"unexpected poll state {state}")

    ext.set_wait_callback(wait)
