"""Queues of events claimed under a lease: the event a dispatcher holds (`ClaimedEvent`), what the
outbox dispatcher (saga.dispatcher) needs of a queue (`EventQueue`) and of the unit of work that
reaches it, and `LeasedQueue`, the claim, renewal and fenced writes those queues share. The outbox
(`db.outbox.OutboxStore` in `db.unit_of_work.OrdersUnitOfWork`) is one, the event relay's queue
(`db.relay.RelayQueue` in `db.relay.RelayUnitOfWork`) another; each brings its table and its claim
rule (`QueueTable`).

Life of a row: PENDING (claimable once `available_at` has passed and no live lease holds it) ->
DONE, or back to PENDING later (retry, deferral), or DEAD (an operator's to inspect and replay).

A claim is one statement: due PENDING rows, oldest first, that no earlier event of the same order
holds back (the queue's rule), `FOR UPDATE SKIP LOCKED` on PostgreSQL (ignored by SQLite, whose
single writer needs no such thing), stamped with a fresh lease token. Every later write is fenced
on that token: a dispatcher whose lease expired and was taken over changes nothing.

A claim counts an attempt and a claim number (`claims`, never reset): a process that dies while
running an event has used an attempt, so an event that kills its process every time still ends
DEAD; a deferral gives its attempt back. (id, claims) is the step's fence in the inventory
(`domain.inventory.Fence`). Times that decide who may run an event are the database's (`db.clock`).

Why one module of this size: the statements and the store that runs them share the claimed
columns and the fencing (lease token) of every write; apart, each half would reach into the other.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from types import TracebackType
from typing import Any, ClassVar, Protocol, Self, TypeVar

from sqlalchemy import (
    BigInteger,
    Case,
    ColumnElement,
    FromClause,
    Integer,
    Select,
    String,
    Table,
    Update,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql

from db import clock, precompiled
from db.backend import backend_of
from db.driver import Statements
from db.tables import UTCDateTime
from domain.fencing import Fence

PENDING = "PENDING"
DONE = "DONE"
DEAD = "DEAD"
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class ClaimedEvent:
    """An event this process holds the lease on."""

    id: int
    aggregate_id: str
    event_type: str
    payload: str
    headers: Mapping[str, str]
    attempts: int  # this one included
    created_at: datetime
    lease_token: str
    claimed_at: datetime  # on PostgreSQL, like created_at, the database's time
    claims: int = 1  # the number of the claim that leased it
    # The attempt before this one never recorded an outcome (its process died or stalled): this
    # event may be what killed it, so the dispatcher runs it alone (see saga.dispatcher).
    suspect: bool = False

    @property
    def correlation_id(self) -> str | None:
        return self.headers.get("correlation_id")

    @property
    def fence(self) -> Fence:
        """The token that fences this lease's writes in the inventory."""
        return Fence(self.id, self.claims)

    @property
    def age_s(self) -> float:
        """Seconds from the event's creation to its claim, on one clock (see `db.clock`)."""
        return max((self.claimed_at - self.created_at).total_seconds(), 0.0)


class EventQueue(Protocol):
    def complete_and_claim(
        self, finished: Sequence[ClaimedEvent], limit: int, lease: timedelta, now: datetime
    ) -> tuple[set[int], list[ClaimedEvent]]:
        """Mark `finished` DONE (fenced), then lease up to `limit` due events: the ids marked, and
        the events leased."""
        ...

    def renew(self, events: Sequence[ClaimedEvent], lease: timedelta, now: datetime) -> set[int]:
        """Extend the leases still held; the ids renewed."""
        ...

    def reschedule(
        self, event: ClaimedEvent, delay_s: float, now: datetime, error: str | None, count_attempt: bool
    ) -> bool:
        """Back to PENDING after `delay_s` (fenced); a deferral gives its attempt back."""
        ...

    def bury(self, event: ClaimedEvent, error: str | None, now: datetime) -> bool:
        """DEAD (fenced)."""
        ...


Q = TypeVar("Q", covariant=True)


class QueueUnitOfWork(Protocol[Q]):
    """A transaction that reaches a queue (`Q`) as `outbox`: rolled back unless `commit()` is called."""

    @property
    def outbox(self) -> Q: ...

    def commit(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


# Called with `single_statement=True` for the dispatcher's rounds and lease renewals.
QueueUowFactory = Callable[..., QueueUnitOfWork[EventQueue]]


@dataclass(frozen=True, eq=False)  # hashed by identity: the statement builders' caches key on it
class QueueTable:
    """A queue's table and what differs between queues: the columns a claim returns, and the claim
    rule, the conditions on which an `earlier` row (an alias of the table) holds a row back."""

    table: Table
    claimed: tuple[ColumnElement[Any], ...]
    holds_back: Callable[[Table, FromClause], tuple[ColumnElement[bool], ...]]


_UNFINISHED = " did not finish: its lease ran out (the process died or stalled)"


def unfinished_attempt(attempt: int) -> str:
    """The `last_error` a claim writes when attempt `attempt` never recorded an outcome."""
    return f"attempt {attempt}{_UNFINISHED}"


def _unfinished_attempt(queue: Table) -> Case[Any]:
    """The claim's `last_error`: a row still leased when claimed was left by an attempt that never
    recorded an outcome (its process died, or stalled past the lease); say so, keep it otherwise."""
    return case(
        (
            queue.c.locked_until.is_not(None),
            literal("attempt ") + cast(queue.c.attempts, String) + literal(_UNFINISHED),
        ),
        else_=queue.c.last_error,
    )


# Statements run for every batch or event, built once per queue and dialect: SQLAlchemy then only
# binds parameters (building them per call was most of the dispatcher thread's time in a profile).


@lru_cache(maxsize=8)
def claim_statement(queue: QueueTable, dialect: str, sparing_ids: bool = False) -> Update:
    """The claim; `sparing_ids`: never an event listed in the array parameter `ids` (the batch the
    same statement completes, see `complete_and_claim_statement`). Parameters: `limit`, `token`
    and `db.clock.parameters(now, lease_s=...)`."""
    table, earlier = queue.table, queue.table.alias("earlier")
    now = clock.now(dialect)
    spared = (
        (~(table.c.id == any_(bindparam("ids", type_=postgresql.ARRAY(BigInteger)))),) if sparing_ids else ()
    )
    due = (
        select(table.c.id)
        .where(
            *spared,
            table.c.status == PENDING,
            table.c.available_at <= now,
            (table.c.locked_until.is_(None)) | (table.c.locked_until < now),
            ~select(earlier.c.id).where(*queue.holds_back(table, earlier)).exists(),
        )
        .order_by(table.c.id)
        .limit(bindparam("limit", type_=Integer))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(table)
        .where(table.c.id.in_(due))
        .values(
            lease_token=bindparam("token"),
            locked_until=clock.later(dialect, "lease_s"),
            updated_at=now,
            attempts=table.c.attempts + 1,
            claims=table.c.claims + 1,
            last_error=_unfinished_attempt(table),
        )
        .returning(*queue.claimed, now.label("claimed_at"))
    )


def _held_by(table: Table, dialect: str) -> tuple[ColumnElement[bool], ...]:
    """The rows of a batch of leases: with array parameters `id = ANY(:ids) AND lease_token =
    ANY(:tokens)`, else (id, token) pairs (`:leases`); see `_lease_parameters`."""
    if backend_of(dialect).one_statement_writes:
        return (
            table.c.id == any_(bindparam("ids", type_=postgresql.ARRAY(BigInteger))),
            table.c.lease_token == any_(bindparam("tokens", type_=postgresql.ARRAY(String))),
        )
    # `id IN` first: SQLite's planner does not look up a row-value IN by the primary key, and took
    # the status index instead, reading every PENDING event for each completion.
    return (
        table.c.id.in_(bindparam("ids", expanding=True)),
        tuple_(table.c.id, table.c.lease_token).in_(bindparam("leases", expanding=True)),
    )


def _lease_parameters(dialect: str, events: Sequence[ClaimedEvent]) -> dict[str, Any]:
    if backend_of(dialect).one_statement_writes:
        return {"ids": [e.id for e in events], "tokens": list({e.lease_token for e in events})}
    return {"ids": [e.id for e in events], "leases": [(e.id, e.lease_token) for e in events]}


def done_values() -> dict[str, Any]:
    """What marking an event DONE writes (`now` is a parameter); the fenced completions use it."""
    return {
        "status": DONE,
        "lease_token": None,
        "locked_until": None,
        "updated_at": bindparam("now", type_=UTCDateTime()),
    }


@lru_cache(maxsize=4)
def complete_many_statement(queue: QueueTable, dialect: str) -> Update:
    """On PostgreSQL `id = ANY(:ids) AND lease_token = ANY(:tokens)`: two array parameters, where
    an expanding tuple IN costs SQLAlchemy a rewrite of the statement per call. It is a looser
    match than the (id, token) pairs, and safe: tokens are this process's own, so it can only mark
    an event whose lease this process holds and one of whose runs here has finished."""
    table = queue.table
    return (
        update(table)
        .where(*_held_by(table, dialect), table.c.status == PENDING)
        .values(done_values())
        .returning(table.c.id)
    )


@lru_cache(maxsize=4)
def held_statement(queue: QueueTable, dialect: str) -> Select[Any]:
    """The ids of the events of a batch of leases (matched as in `complete_many_statement`) still
    PENDING under them: what this process may still complete."""
    table = queue.table
    return select(table.c.id).where(*_held_by(table, dialect), table.c.status == PENDING)


@lru_cache(maxsize=4)
def complete_one_statement(queue: QueueTable) -> Update:
    """`complete_many_statement` for one event (parameters `event_id`, `token`, `now`): no array and
    no expanding list, so either database runs it from SQL compiled once (db.precompiled)."""
    table = queue.table
    return (
        update(table)
        .where(
            table.c.id == bindparam("event_id", type_=table.c.id.type),
            table.c.lease_token == bindparam("token", type_=String),
            table.c.status == PENDING,
        )
        .values(done_values())
        .returning(table.c.id)
    )


@lru_cache(maxsize=2)
def complete_and_claim_statement(queue: QueueTable) -> Select[Any]:
    """`complete_and_claim` on PostgreSQL, one statement:

        WITH done AS (<complete_many> RETURNING id), claimed AS (<claim sparing done's ids> RETURNING ...)
        SELECT (SELECT array_agg(id) FROM done) AS done_ids, claimed.* FROM (SELECT 1) LEFT JOIN claimed

    Always one row at least, so the completed ids come back when nothing is claimed. Both parts see
    the statement's one snapshot: an event whose earlier event of the same order is completed here
    is claimable only from the next claim on (the dispatcher starts one when a round completed
    events)."""
    done = complete_many_statement(queue, "postgresql").cte("done")
    claimed = claim_statement(queue, "postgresql", sparing_ids=True).cte("claimed")
    done_ids = select(func.array_agg(done.c.id)).scalar_subquery().label("done_ids")
    one = select(literal(1).label("one")).subquery("one")
    columns = (*(claimed.c[column.name] for column in queue.claimed), claimed.c.claimed_at)
    return select(done_ids, *columns).select_from(one.outerjoin(claimed, true()))


def hot_statements(queue: QueueTable, dialect: str) -> list[Any]:
    """The statements every dispatcher round or saga step of `queue` runs, for `db.warm`."""
    statements: list[Any] = [
        claim_statement(queue, dialect),
        complete_many_statement(queue, dialect),
        complete_one_statement(queue),
        renew_statement(queue, dialect),
    ]
    if backend_of(dialect).one_statement_writes:
        statements.append(complete_and_claim_statement(queue))
    else:
        statements.append(held_statement(queue, dialect))  # the batch settle's (OrdersUnitOfWork)
    return statements


@lru_cache(maxsize=4)
def renew_statement(queue: QueueTable, dialect: str) -> Update:
    """Extend leases still held and not run out (matched as in `complete_many_statement`):
    RETURNING the ids renewed. A lease that ran out stays out, even if no one has taken the event."""
    table = queue.table
    return (
        update(table)
        .where(
            *_held_by(table, dialect), table.c.status == PENDING, table.c.locked_until > clock.now(dialect)
        )
        .values(locked_until=clock.later(dialect, "lease_s"))
        .returning(table.c.id)
    )


class LeasedQueue:
    """A queue of events on one connection: what `EventQueue` asks (claim, renew, fenced complete,
    reschedule and bury), and the housekeeping (purge, backlog, replay). A subclass names its
    `QueueTable` and says what a claimed row is to the dispatcher (`_content`)."""

    queue: ClassVar[QueueTable]

    def __init__(self, connection: Statements) -> None:
        self._c = connection

    @staticmethod
    def _content(row: Any) -> tuple[str, str, str]:
        """A claimed row's aggregate id, event type and payload."""
        raise NotImplementedError

    def claim(self, limit: int, lease: timedelta, now: datetime) -> list[ClaimedEvent]:
        """Lease up to `limit` due events (oldest first, as the queue's rule lets them through), for
        `lease` by the database's clock (`now` is used on SQLite only, see `db.clock`)."""
        if limit <= 0:
            return []
        token = str(uuid.uuid4())
        parameters = {"limit": limit, "token": token, **clock.parameters(now, lease_s=lease.total_seconds())}
        statement = claim_statement(self.queue, self._c.dialect.name)
        return self._claimed(precompiled.execute(self._c, statement, parameters).all(), token)

    def _claimed(self, rows: Sequence[Any], token: str) -> list[ClaimedEvent]:
        events = []
        for row in rows:
            aggregate_id, event_type, payload = self._content(row)
            events.append(
                ClaimedEvent(
                    id=row.id,
                    aggregate_id=aggregate_id,
                    event_type=event_type,
                    payload=payload,
                    headers=headers_of(row.headers),
                    attempts=row.attempts,
                    created_at=utc(row.created_at),
                    lease_token=token,
                    claimed_at=utc(row.claimed_at),
                    claims=row.claims,
                    suspect=row.last_error == unfinished_attempt(row.attempts - 1),
                )
            )
        return sorted(events, key=lambda e: e.id)

    def complete_and_claim(
        self, finished: Sequence[ClaimedEvent], limit: int, lease: timedelta, now: datetime
    ) -> tuple[set[int], list[ClaimedEvent]]:
        """`complete_many(finished)`, then `claim(limit)`: the completed ids and the claimed events.
        On PostgreSQL one statement (`complete_and_claim_statement`), the dispatcher's every
        round; on SQLite the two."""
        if not backend_of(self._c).one_statement_writes or not finished or limit <= 0:
            return self.complete_many(finished, now), self.claim(limit, lease, now)
        token = str(uuid.uuid4())
        parameters = {
            **_lease_parameters(self._c.dialect.name, finished),
            "limit": limit,
            "token": token,
            **clock.parameters(now, lease_s=lease.total_seconds()),
        }
        rows = precompiled.execute(self._c, complete_and_claim_statement(self.queue), parameters).all()
        done = set(rows[0].done_ids or ())
        return done, self._claimed([row for row in rows if row.id is not None], token)

    def renew(self, events: Sequence[ClaimedEvent], lease: timedelta, now: datetime) -> set[int]:
        """Extend the leases of `events` that this process still holds, to `lease` from now by the
        database's clock; the ids renewed (an event missing ran out of its lease, was taken over,
        or is finished)."""
        if not events:
            return set()
        dialect = self._c.dialect.name
        parameters = {
            **clock.parameters(now, lease_s=lease.total_seconds()),
            **_lease_parameters(dialect, events),
        }
        return set(precompiled.execute(self._c, renew_statement(self.queue, dialect), parameters).scalars())

    def held(self, events: Sequence[ClaimedEvent]) -> set[int]:
        """The ids of `events` whose lease this process still holds (PENDING under its token)."""
        if not events:
            return set()
        dialect = self._c.dialect.name
        statement = held_statement(self.queue, dialect)
        return set(precompiled.execute(self._c, statement, _lease_parameters(dialect, events)).scalars())

    def complete(self, event: ClaimedEvent, now: datetime) -> bool:
        """Mark DONE if this lease still holds the event; False means another process took it over."""
        parameters = {"event_id": event.id, "token": event.lease_token, "now": now}
        statement = complete_one_statement(self.queue)
        done = precompiled.execute(self._c, statement, parameters, prepare=True).first()
        return done is not None

    def complete_many(self, events: Sequence[ClaimedEvent], now: datetime) -> set[int]:
        """`complete` for a batch in one statement: the ids that were still this process's to mark."""
        if not events:
            return set()
        dialect = self._c.dialect.name
        parameters = {"now": now, **_lease_parameters(dialect, events)}
        statement = complete_many_statement(self.queue, dialect)
        return set(precompiled.execute(self._c, statement, parameters).scalars())

    def _fenced(self, event: ClaimedEvent) -> Update:
        table = self.queue.table
        return update(table).where(
            table.c.id == event.id, table.c.lease_token == event.lease_token, table.c.status == PENDING
        )

    def reschedule(
        self,
        event: ClaimedEvent,
        delay_s: float,
        now: datetime,
        error: str | None,
        count_attempt: bool,
    ) -> bool:
        """Back to PENDING, due `delay_s` from now by the database's clock; a deferral
        (`count_attempt=False`) gives back the attempt its claim counted."""
        dialect = self._c.dialect.name
        attempts = self.queue.table.c.attempts
        values: dict[str, Any] = {
            "available_at": clock.later(dialect, "delay_s"),
            "lease_token": None,
            "locked_until": None,
            "updated_at": clock.now(dialect),
        }
        if not count_attempt:
            values["attempts"] = case((attempts > 0, attempts - 1), else_=0)
        if error is not None:
            values["last_error"] = error[:MAX_ERROR_CHARS]
        statement = self._fenced(event).values(**values)
        return self._c.execute(statement, clock.parameters(now, delay_s=delay_s)).rowcount == 1

    def bury(self, event: ClaimedEvent, error: str | None, now: datetime) -> bool:
        """DEAD: no more attempts (the claim counted the last); the error (None: the one the row
        holds) stays for an operator."""
        values: dict[str, Any] = {
            "status": DEAD,
            "lease_token": None,
            "locked_until": None,
            "updated_at": now,
        }
        if error is not None:
            values["last_error"] = error[:MAX_ERROR_CHARS]
        return self._c.execute(self._fenced(event).values(**values)).rowcount == 1

    def purge_done(self, older_than: datetime, batch: int) -> int:
        """Delete at most `batch` DONE rows last touched before `older_than`."""
        table = self.queue.table
        doomed = (
            select(table.c.id)
            .where(table.c.status == DONE, table.c.updated_at < older_than)
            .order_by(table.c.id)
            .limit(batch)
            .scalar_subquery()
        )
        return self._c.execute(delete(table).where(table.c.id.in_(doomed))).rowcount

    def backlog(self, now: datetime) -> tuple[int, float]:
        """Number of PENDING events and the age in seconds of the oldest one."""
        table = self.queue.table
        row = self._c.execute(
            select(func.count(), func.min(table.c.created_at)).where(table.c.status == PENDING)
        ).one()
        count, oldest = int(row[0]), row[1]
        if oldest is None:
            return count, 0.0
        return count, max((now - utc(oldest)).total_seconds(), 0.0)  # aggregates bypass the type on SQLite

    def replay(self, event_id: int, now: datetime) -> bool:
        """Put a DEAD event back to PENDING with its attempts reset (an operator's call)."""
        table = self.queue.table
        result = self._c.execute(
            update(table)
            .where(table.c.id == event_id, table.c.status == DEAD)
            .values(status=PENDING, attempts=0, available_at=now, updated_at=now)
        )
        return result.rowcount == 1


def headers_of(raw: str) -> dict[str, str]:
    """An event's headers from their JSON (nothing from anything else)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def utc(value: Any) -> datetime:
    """A time read back from a RETURNING expression or an aggregate (no column type on SQLite):
    aware UTC."""
    moment: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
