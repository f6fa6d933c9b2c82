"""Database exceptions translated into domain errors, in one place."""

from __future__ import annotations

import psycopg2
from sqlalchemy import exc as sa_exc

from domain.errors import ConflictError, DeadlineExceededError, DomainError, UnavailableError

# PostgreSQL SQLSTATEs: serialization_failure, deadlock_detected, query_canceled, lock_not_available.
_CONFLICT_CODES = {"40001", "40P01"}
_CANCELED = "57014"


class GaveUpAtDeadline(psycopg2.OperationalError):  # type: ignore[misc]  # no stubs: Any
    """The client side stopped waiting for PostgreSQL at the caller's deadline plus a grace
    (db.engine's wait callback), before the server's statement_timeout answered. The timeout is
    PostgreSQL's per statement, set from the budget left as the transaction began: a statement
    that starts later in the transaction is cancelled only past the deadline. Either way the
    caller's deadline passed: DEADLINE_EXCEEDED, not an outage. An OperationalError still, so
    that SQLAlchemy counts the connection (closed by psycopg2) as lost."""


def sqlstate(error: BaseException) -> str | None:
    orig = getattr(error, "orig", None)
    code = getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def _sqlite_busy(error: sa_exc.DBAPIError) -> bool:
    """SQLite gave up waiting for another connection's lock (SQLITE_BUSY, "database is locked")."""
    orig = error.orig
    return getattr(orig, "sqlite_errorname", None) == "SQLITE_BUSY" or "database is locked" in str(orig)


def waited_past_deadline() -> DeadlineExceededError:
    """The caller's deadline passed while the call waited for the database (or for its turn at it)."""
    return DeadlineExceededError("deadline exceeded while waiting for the database")


def translate(error: BaseException, *, deadline_set: bool = False) -> DomainError | None:
    """The domain error a database exception stands for, or None if it is a bug to report as is."""
    if isinstance(error, DomainError):
        return None
    if isinstance(error, sa_exc.TimeoutError):
        return UnavailableError("database connection pool exhausted")
    if isinstance(error, sa_exc.IntegrityError) and (
        sqlstate(error) == "23505" or "UNIQUE constraint failed" in str(error.orig)
    ):
        return ConflictError("a row with this key was written concurrently")
    if isinstance(error, sa_exc.DBAPIError):
        code = sqlstate(error)
        if code in _CONFLICT_CODES:
            return ConflictError("concurrent update conflict")
        if code == "42P01":
            return UnavailableError("database schema is not migrated")
        # Each wait is cut to the caller's deadline: PostgreSQL's statement_timeout, SQLite's busy
        # timeout (db.engine), the client's own wait on PostgreSQL (raised only under a deadline).
        timed_out = code == _CANCELED or _sqlite_busy(error)
        if (deadline_set and timed_out) or isinstance(error.orig, GaveUpAtDeadline):
            return waited_past_deadline()
        if code == _CANCELED:
            return UnavailableError("database statement timed out")
        if error.connection_invalidated or isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
            return UnavailableError("database unavailable")
    return None
