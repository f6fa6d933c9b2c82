"""The outbox store: events written with the change that raised them, claimed under a lease.

Life of a row: PENDING (claimable once `available_at` has passed and no live lease holds it) ->
DONE, or back to PENDING later (retry, deferral), or DEAD (an operator's to inspect and replay).

A claim is one statement: due PENDING rows, oldest first, that have no earlier PENDING event of
the same aggregate (per-order ordering), `FOR UPDATE SKIP LOCKED` on PostgreSQL (ignored by
SQLite, whose single writer needs no such thing), stamped with a fresh lease token. Every later
write is fenced on that token: a dispatcher whose lease expired and was taken over changes nothing.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Case,
    ColumnElement,
    Connection,
    Integer,
    Select,
    String,
    Update,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql

from db import clock, precompiled
from db.backend import backend_of
from db.chained import DB_NOW, DbLater, insert_together
from db.tables import outbox_events as outbox
from domain import correlation
from domain.events import DomainEvent
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


@dataclass(frozen=True)
class Lease:
    """A lease taken before the events exist: a process that will run the events it is about to
    commit writes them already leased to itself (`token`, for `seconds` from the commit by the
    database's clock), so no claim is needed and no other process takes them; `count` events,
    one worker each (saga.dispatcher). The write is their first claim and attempt."""

    token: str
    seconds: float
    count: int = 1


@dataclass(frozen=True)
class OutboxRow:
    """A row as an operator sees it."""

    id: int
    aggregate_id: str
    event_type: str
    status: str
    attempts: int
    available_at: datetime
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    payload: str = field(repr=False)


def _headers(raw: str) -> dict[str, str]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


# Statements run for every batch or event, built once: SQLAlchemy then only binds parameters
# (building them per call was most of the dispatcher thread's time in a profile).


_CLAIMED = (
    outbox.c.id,
    outbox.c.aggregate_id,
    outbox.c.event_type,
    outbox.c.payload,
    outbox.c.headers,
    outbox.c.attempts,
    outbox.c.claims,
    outbox.c.created_at,
    outbox.c.last_error,
)


_UNFINISHED = " did not finish: its lease ran out (the process died or stalled)"


def unfinished_attempt(attempt: int) -> str:
    """The `last_error` a claim writes when attempt `attempt` never recorded an outcome."""
    return f"attempt {attempt}{_UNFINISHED}"


def _unfinished_attempt() -> Case[Any]:
    """The claim's `last_error`: a row still leased when claimed was left by an attempt that never
    recorded an outcome (its process died, or stalled past the lease); say so, keep it otherwise."""
    return case(
        (
            outbox.c.locked_until.is_not(None),
            literal("attempt ") + cast(outbox.c.attempts, String) + literal(_UNFINISHED),
        ),
        else_=outbox.c.last_error,
    )


@lru_cache(maxsize=4)
def _claim_statement(dialect: str, sparing_ids: bool = False) -> Update:
    """The claim; `sparing_ids`: never an event listed in the array parameter `ids` (the batch the
    same statement completes, see `_complete_and_claim_statement`). Parameters: `limit`, `token`
    and `db.clock.parameters(now, lease_s=...)`."""
    now = clock.now(dialect)
    earlier = outbox.alias("earlier")
    spared = (
        (~(outbox.c.id == any_(bindparam("ids", type_=postgresql.ARRAY(BigInteger)))),) if sparing_ids else ()
    )
    due = (
        select(outbox.c.id)
        .where(
            *spared,
            outbox.c.status == PENDING,
            outbox.c.available_at <= now,
            (outbox.c.locked_until.is_(None)) | (outbox.c.locked_until < now),
            ~select(earlier.c.id)
            .where(
                earlier.c.aggregate_id == outbox.c.aggregate_id,
                earlier.c.status == PENDING,
                earlier.c.id < outbox.c.id,
            )
            .exists(),
        )
        .order_by(outbox.c.id)
        .limit(bindparam("limit", type_=Integer))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(outbox)
        .where(outbox.c.id.in_(due))
        .values(
            lease_token=bindparam("token"),
            locked_until=clock.later(dialect, "lease_s"),
            updated_at=now,
            attempts=outbox.c.attempts + 1,
            claims=outbox.c.claims + 1,
            last_error=_unfinished_attempt(),
        )
        .returning(*_CLAIMED, now.label("claimed_at"))
    )


@lru_cache(maxsize=2)
def _complete_many_statement(dialect: str) -> Update:
    """On PostgreSQL `id = ANY(:ids) AND lease_token = ANY(:tokens)`: two array parameters, where
    an expanding tuple IN costs SQLAlchemy a rewrite of the statement per call. It is a looser
    match than the (id, token) pairs, and safe: tokens are this process's own, so it can only mark
    an event whose lease this process holds and one of whose runs here has finished."""
    held = _held_by(dialect)
    return (
        update(outbox).where(*held, outbox.c.status == PENDING).values(done_values()).returning(outbox.c.id)
    )


def _held_by(dialect: str) -> tuple[ColumnElement[bool], ...]:
    """The rows of a batch of leases: with array parameters `id = ANY(:ids) AND lease_token =
    ANY(:tokens)`, else (id, token) pairs (`:leases`); see `_lease_parameters`."""
    if backend_of(dialect).one_statement_writes:
        return (
            outbox.c.id == any_(bindparam("ids", type_=postgresql.ARRAY(BigInteger))),
            outbox.c.lease_token == any_(bindparam("tokens", type_=postgresql.ARRAY(String))),
        )
    return (tuple_(outbox.c.id, outbox.c.lease_token).in_(bindparam("leases", expanding=True)),)


def _lease_parameters(dialect: str, events: Sequence[ClaimedEvent]) -> dict[str, Any]:
    if backend_of(dialect).one_statement_writes:
        return {"ids": [e.id for e in events], "tokens": list({e.lease_token for e in events})}
    return {"leases": [(e.id, e.lease_token) for e in events]}


def done_values() -> dict[str, Any]:
    """What marking an event DONE writes (`now` is a parameter); the fenced completions use it."""
    return {
        "status": DONE,
        "lease_token": None,
        "locked_until": None,
        "updated_at": bindparam("now", type_=outbox.c.updated_at.type),
    }


@lru_cache(maxsize=1)
def _complete_and_claim_statement() -> Select[Any]:
    """`complete_and_claim` on PostgreSQL, one statement:

        WITH done AS (<complete_many> RETURNING id), claimed AS (<claim sparing done's ids> RETURNING ...)
        SELECT (SELECT array_agg(id) FROM done) AS done_ids, claimed.* FROM (SELECT 1) LEFT JOIN claimed

    Always one row at least, so the completed ids come back when nothing is claimed. Both parts see
    the statement's one snapshot: an event whose earlier event of the same order is completed here
    is claimable only from the next claim on."""
    done = _complete_many_statement("postgresql").cte("done")
    claimed = _claim_statement("postgresql", sparing_ids=True).cte("claimed")
    done_ids = select(func.array_agg(done.c.id)).scalar_subquery().label("done_ids")
    one = select(literal(1).label("one")).subquery("one")
    columns = (*(claimed.c[column.name] for column in _CLAIMED), claimed.c.claimed_at)
    return select(done_ids, *columns).select_from(one.outerjoin(claimed, true()))


@lru_cache(maxsize=2)
def _renew_statement(dialect: str) -> Update:
    """Extend leases still held and not run out (matched as in `_complete_many_statement`):
    RETURNING the ids renewed. A lease that ran out stays out, even if no one has taken the event."""
    return (
        update(outbox)
        .where(*_held_by(dialect), outbox.c.status == PENDING, outbox.c.locked_until > clock.now(dialect))
        .values(locked_until=clock.later(dialect, "lease_s"))
        .returning(outbox.c.id)
    )


class OutboxStore:
    def __init__(self, connection: Connection) -> None:
        self._c = connection

    def add(
        self,
        events: Iterable[DomainEvent],
        correlation_id: str | None,
        now: datetime,
        lease: Lease | None = None,
    ) -> list[ClaimedEvent]:
        """Store `events`; with a `lease`, already leased, and returned as claimed (else [])."""
        dialect = self._c.dialect.name
        one_statement = backend_of(dialect).one_statement_writes
        rows = self.new_rows(events, correlation_id, now, lease, dialect)
        if not rows:
            return []
        if lease is None:
            if one_statement:
                insert_together(self._c, [(outbox, rows)])
            else:
                self._c.execute(insert(outbox), rows)
            return []
        if one_statement:  # its RETURNING gives one key: one statement a row
            ids = [insert_together(self._c, [(outbox, [row])], returning=True)[0] for row in rows]
        else:
            one = insert(outbox).returning(outbox.c.id)
            ids = [int(self._c.execute(one, row).scalar_one()) for row in rows]
        return self.leased(rows, ids, lease, now)

    @staticmethod
    def new_rows(
        events: Iterable[DomainEvent],
        correlation_id: str | None,
        now: datetime,
        lease: Lease | None = None,
        dialect: str = "sqlite",
    ) -> list[dict[str, Any]]:
        """The PENDING rows that store `events` (see `add`), leased when `lease` is given. On
        PostgreSQL the times are the database's, written by `db.chained.insert_together`."""
        # The correlation id, and the trace context in hand when tracing is on (domain.correlation).
        headers = json.dumps(correlation.event_headers(correlation_id))
        database_clock = backend_of(dialect).database_clock
        at: Any = DB_NOW if database_clock else now
        rows: list[dict[str, Any]] = [
            {
                "aggregate_id": event.order_id,
                "event_type": event.event_type,
                "payload": json.dumps(event.payload(), ensure_ascii=False, separators=(",", ":")),
                "headers": headers,
                "status": PENDING,
                "attempts": 0,
                "claims": 0,
                "available_at": at,
                "created_at": at,
                "updated_at": at,
            }
            for event in events
        ]
        if lease is not None:
            if len(rows) != lease.count:
                raise ValueError(f"a lease for {lease.count} event(s) cannot hold {len(rows)}")
            later = timedelta(seconds=lease.seconds)
            until = DbLater(lease.seconds) if database_clock else now + later
            for row in rows:
                row.update(lease_token=lease.token, locked_until=until, attempts=1, claims=1)
        return rows

    @staticmethod
    def leased(
        rows: Sequence[Mapping[str, Any]], ids: Sequence[int], lease: Lease, now: datetime
    ) -> list[ClaimedEvent]:
        """The events of `rows` (see `new_rows`), stored under `ids`, as their lease holder sees them
        (created and claimed `now`: their age is nil on any clock)."""
        return [
            ClaimedEvent(
                id=event_id,
                aggregate_id=row["aggregate_id"],
                event_type=row["event_type"],
                payload=row["payload"],
                headers=_headers(row["headers"]),
                attempts=1,
                created_at=now,
                lease_token=lease.token,
                claimed_at=now,
                claims=1,
            )
            for row, event_id in zip(rows, ids, strict=True)
        ]

    def add_raw(
        self, aggregate_id: str, event_type: str, payload: str, headers: Mapping[str, str], now: datetime
    ) -> int:
        """Insert an event as given (tests and operators use it for events no domain object makes)."""
        result = self._c.execute(
            insert(outbox).returning(outbox.c.id),
            {
                "aggregate_id": aggregate_id,
                "event_type": event_type,
                "payload": payload,
                "headers": json.dumps(dict(headers)),
                "status": PENDING,
                "attempts": 0,
                "available_at": now,
                "created_at": now,
                "updated_at": now,
            },
        )
        return int(result.scalar_one())

    def claim(self, limit: int, lease: timedelta, now: datetime) -> list[ClaimedEvent]:
        """Lease up to `limit` due events (oldest first, one per aggregate at a time), for `lease`
        by the database's clock (`now` is used on SQLite only, see `db.clock`)."""
        if limit <= 0:
            return []
        token = str(uuid.uuid4())
        parameters = {"limit": limit, "token": token, **clock.parameters(now, lease_s=lease.total_seconds())}
        rows = precompiled.execute(self._c, _claim_statement(self._c.dialect.name), parameters).all()
        return self._claimed(rows, token)

    @staticmethod
    def _claimed(rows: Sequence[Any], token: str) -> list[ClaimedEvent]:
        return sorted(
            (
                ClaimedEvent(
                    id=row.id,
                    aggregate_id=row.aggregate_id,
                    event_type=row.event_type,
                    payload=row.payload,
                    headers=_headers(row.headers),
                    attempts=row.attempts,
                    created_at=row.created_at,
                    lease_token=token,
                    claimed_at=_utc(row.claimed_at),
                    claims=row.claims,
                    suspect=row.last_error == unfinished_attempt(row.attempts - 1),
                )
                for row in rows
            ),
            key=lambda e: e.id,
        )

    def complete_and_claim(
        self, finished: Sequence[ClaimedEvent], limit: int, lease: timedelta, now: datetime
    ) -> tuple[set[int], list[ClaimedEvent]]:
        """`complete_many(finished)`, then `claim(limit)`: the completed ids and the claimed events.
        On PostgreSQL one statement (`_complete_and_claim_statement`), the dispatcher's every
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
        rows = precompiled.execute(self._c, _complete_and_claim_statement(), parameters).all()
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
        return set(precompiled.execute(self._c, _renew_statement(dialect), parameters).scalars())

    def _fenced(self, event: ClaimedEvent) -> Any:
        return update(outbox).where(
            outbox.c.id == event.id, outbox.c.lease_token == event.lease_token, outbox.c.status == PENDING
        )

    def complete(self, event: ClaimedEvent, now: datetime) -> bool:
        """Mark DONE if this lease still holds the event; False means another process took it over."""
        return event.id in self.complete_many([event], now)

    def complete_many(self, events: Sequence[ClaimedEvent], now: datetime) -> set[int]:
        """`complete` for a batch in one statement: the ids that were still this process's to mark."""
        if not events:
            return set()
        dialect = self._c.dialect.name
        parameters = {"now": now, **_lease_parameters(dialect, events)}
        statement = _complete_many_statement(dialect)
        return set(precompiled.execute(self._c, statement, parameters).scalars())

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
        values: dict[str, Any] = {
            "available_at": clock.later(dialect, "delay_s"),
            "lease_token": None,
            "locked_until": None,
            "updated_at": clock.now(dialect),
        }
        if not count_attempt:
            values["attempts"] = case((outbox.c.attempts > 0, outbox.c.attempts - 1), else_=0)
        if error is not None:
            values["last_error"] = error[:MAX_ERROR_CHARS]
        statement = self._fenced(event).values(**values)
        return self._c.execute(statement, clock.parameters(now, delay_s=delay_s)).rowcount == 1

    def bury(self, event: ClaimedEvent, error: str | None, now: datetime) -> bool:
        """DEAD: no more attempts (the claim counted the last); the error (None: the one the row
        holds) stays for an operator."""
        values: dict[str, Any] = {"status": DEAD, "lease_token": None, "locked_until": None}
        values["updated_at"] = now
        if error is not None:
            values["last_error"] = error[:MAX_ERROR_CHARS]
        return self._c.execute(self._fenced(event).values(**values)).rowcount == 1

    def purge_done(self, older_than: datetime, batch: int) -> int:
        """Delete at most `batch` DONE rows last touched before `older_than`."""
        doomed = (
            select(outbox.c.id)
            .where(outbox.c.status == DONE, outbox.c.updated_at < older_than)
            .order_by(outbox.c.id)
            .limit(batch)
            .scalar_subquery()
        )
        return self._c.execute(delete(outbox).where(outbox.c.id.in_(doomed))).rowcount

    def backlog(self, now: datetime) -> tuple[int, float]:
        """Number of PENDING events and the age in seconds of the oldest one."""
        row = self._c.execute(
            select(func.count(), func.min(outbox.c.created_at)).where(outbox.c.status == PENDING)
        ).one()
        count, oldest = row[0], row[1]
        if oldest is None:
            return int(count), 0.0
        if oldest.tzinfo is None:  # aggregates bypass the column type on SQLite
            oldest = datetime.fromisoformat(str(oldest)).replace(tzinfo=now.tzinfo)
        return int(count), max((now - oldest).total_seconds(), 0.0)

    def rows(
        self,
        status: str | None = None,
        aggregate_id: str | None = None,
        limit: int = 100,
        event_id: int | None = None,
    ) -> list[OutboxRow]:
        query = select(outbox)
        if event_id is not None:
            query = query.where(outbox.c.id == event_id)
        if status is not None:
            query = query.where(outbox.c.status == status)
        if aggregate_id is not None:
            query = query.where(outbox.c.aggregate_id == aggregate_id)
        result = self._c.execute(query.order_by(outbox.c.id).limit(limit)).all()
        shown = [f.name for f in fields(OutboxRow)]
        return [OutboxRow(**{name: r._mapping[name] for name in shown}) for r in result]

    def replay(self, event_id: int, now: datetime) -> bool:
        """Put a DEAD event back to PENDING with its attempts reset."""
        result = self._c.execute(
            update(outbox)
            .where(outbox.c.id == event_id, outbox.c.status == DEAD)
            .values(status=PENDING, attempts=0, available_at=now, updated_at=now)
        )
        return result.rowcount == 1


def _utc(value: datetime) -> datetime:
    """A time read back from a RETURNING expression (no column type on SQLite): aware UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
