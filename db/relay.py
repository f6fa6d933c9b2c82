"""The event relay's queue (`relay_events`): changes of orders waiting to be published to the
message broker, claimed under a lease like the outbox (`db.outbox`), by a second instance of the
outbox dispatcher (see `db.queue`: this module's `RelayUnitOfWork` is what that dispatcher works
on). `db.recording` writes the rows, in the transaction of each change.

Why a table of its own and not a column of the outbox: its rows exist only while the relay is on
(off, the service writes exactly what it wrote before), the broker's outages defer and count
attempts on the relay's rows alone, and the claim rule differs.

The claim rule: due PENDING rows whose lease is free or ran out, oldest first, `FOR UPDATE SKIP
LOCKED` on PostgreSQL, and only an order's oldest event not yet DONE: a row is skipped while a row
of the same order with a lower version is PENDING or DEAD. So one order's events are published
strictly one after another, in version order, whichever instance claims them: the next one
becomes claimable only once the one before is DONE, which the relay writes only after the broker
acknowledged it. (A DEAD event holds back its order's later events until an operator replays it:
publishing them would show consumers a gap, then the missing event out of order.)

A claim counts an attempt and a claim number, and every later write is fenced on the lease token,
exactly as the outbox's (its `ClaimedEvent` is this queue's too). The dispatcher sees a row as a
`ClaimedEvent` whose `event_type` is the kind (placed, validated, ...) and whose `payload` is the
row as JSON (`relay.messages` turns it into the protobuf message).

Why one module of this size: the statements and the store that runs them share the claimed
columns and the fencing of every write, as in `db.outbox`, whose shape this follows.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Case,
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
    literal,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql

from db import clock, precompiled
from db.backend import backend_of
from db.outbox import DEAD, DONE, MAX_ERROR_CHARS, PENDING, ClaimedEvent, unfinished_attempt
from db.tables import relay_events as relay
from db.unit_of_work import UnitOfWork

_UNFINISHED = unfinished_attempt(0).removeprefix("attempt 0")

_CLAIMED = (
    relay.c.id,
    relay.c.order_id,
    relay.c.kind,
    relay.c.version,
    relay.c.customer_id,
    relay.c.order_status,
    relay.c.failure_reason,
    relay.c.occurred_at,
    relay.c.placed_items,
    relay.c.headers,
    relay.c.attempts,
    relay.c.claims,
    relay.c.created_at,
    relay.c.last_error,
)


def _unfinished_attempt() -> Case[Any]:
    """A row still leased when claimed was left by an attempt that never recorded an outcome."""
    return case(
        (
            relay.c.locked_until.is_not(None),
            literal("attempt ") + cast(relay.c.attempts, String) + literal(_UNFINISHED),
        ),
        else_=relay.c.last_error,
    )


@lru_cache(maxsize=4)
def _claim_statement(dialect: str, sparing_ids: bool = False) -> Update:
    """The claim (see the module docstring); `sparing_ids`: never a row listed in the array
    parameter `ids`, which the same statement completes. Parameters: `limit`, `token` and
    `db.clock.parameters(now, lease_s=...)`."""
    now = clock.now(dialect)
    earlier = relay.alias("earlier")
    spared = (
        (~(relay.c.id == any_(bindparam("ids", type_=postgresql.ARRAY(BigInteger)))),) if sparing_ids else ()
    )
    due = (
        select(relay.c.id)
        .where(
            *spared,
            relay.c.status == PENDING,
            relay.c.available_at <= now,
            (relay.c.locked_until.is_(None)) | (relay.c.locked_until < now),
            ~select(earlier.c.id)
            .where(
                earlier.c.order_id == relay.c.order_id,
                earlier.c.version < relay.c.version,
                earlier.c.status != DONE,
            )
            .exists(),
        )
        .order_by(relay.c.id)
        .limit(bindparam("limit", type_=Integer))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(relay)
        .where(relay.c.id.in_(due))
        .values(
            lease_token=bindparam("token"),
            locked_until=clock.later(dialect, "lease_s"),
            updated_at=now,
            attempts=relay.c.attempts + 1,
            claims=relay.c.claims + 1,
            last_error=_unfinished_attempt(),
        )
        .returning(*_CLAIMED, now.label("claimed_at"))
    )


def _held_by(dialect: str) -> tuple[Any, ...]:
    """The rows of a batch of leases (see `db.outbox`): array parameters on PostgreSQL, (id, token)
    pairs elsewhere."""
    if backend_of(dialect).one_statement_writes:
        return (
            relay.c.id == any_(bindparam("ids", type_=postgresql.ARRAY(BigInteger))),
            relay.c.lease_token == any_(bindparam("tokens", type_=postgresql.ARRAY(String))),
        )
    return (tuple_(relay.c.id, relay.c.lease_token).in_(bindparam("leases", expanding=True)),)


def _lease_parameters(dialect: str, events: Sequence[ClaimedEvent]) -> dict[str, Any]:
    if backend_of(dialect).one_statement_writes:
        return {"ids": [e.id for e in events], "tokens": list({e.lease_token for e in events})}
    return {"leases": [(e.id, e.lease_token) for e in events]}


@lru_cache(maxsize=2)
def _complete_many_statement(dialect: str) -> Update:
    """DONE for rows this process still holds (a looser match than (id, token) pairs on
    PostgreSQL, and safe: the tokens are this process's own, see `db.outbox`)."""
    return (
        update(relay)
        .where(*_held_by(dialect), relay.c.status == PENDING)
        .values(
            status=DONE,
            lease_token=None,
            locked_until=None,
            updated_at=bindparam("now", type_=relay.c.updated_at.type),
        )
        .returning(relay.c.id)
    )


@lru_cache(maxsize=1)
def _complete_and_claim_statement() -> Select[Any]:
    """`complete_and_claim` on PostgreSQL, one statement (as the outbox's):

        WITH done AS (<complete_many> RETURNING id), claimed AS (<claim sparing done's ids> ...)
        SELECT (SELECT array_agg(id) FROM done) AS done_ids, claimed.* FROM (SELECT 1) LEFT JOIN claimed

    Both parts see one snapshot: the next event of an order completed here is claimable from the
    next round on (the dispatcher starts one when a round completed events)."""
    done = _complete_many_statement("postgresql").cte("done")
    claimed = _claim_statement("postgresql", sparing_ids=True).cte("claimed")
    done_ids = select(func.array_agg(done.c.id)).scalar_subquery().label("done_ids")
    one = select(literal(1).label("one")).subquery("one")
    columns = (*(claimed.c[column.name] for column in _CLAIMED), claimed.c.claimed_at)
    return select(done_ids, *columns).select_from(one.outerjoin(claimed, true()))


@lru_cache(maxsize=2)
def _renew_statement(dialect: str) -> Update:
    return (
        update(relay)
        .where(*_held_by(dialect), relay.c.status == PENDING, relay.c.locked_until > clock.now(dialect))
        .values(locked_until=clock.later(dialect, "lease_s"))
        .returning(relay.c.id)
    )


def payload_of(row: Any) -> str:
    """A claimed row as the JSON `payload` of its `ClaimedEvent` (read by `relay.messages`)."""
    value: dict[str, Any] = {
        "order_id": row.order_id,
        "version": int(row.version),
        "customer_id": row.customer_id,
        "status": row.order_status,
        "failure_reason": row.failure_reason,
        "occur_time": _utc(row.occurred_at).isoformat(),
    }
    if row.placed_items:
        value["items"] = json.loads(row.placed_items)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class RelayQueue:
    """The relay's queue on one connection: what `db.queue.EventQueue` asks, and the
    housekeeping (purge, backlog)."""

    def __init__(self, connection: Any) -> None:
        self._c = connection

    def claim(self, limit: int, lease: timedelta, now: datetime) -> list[ClaimedEvent]:
        """Lease up to `limit` due events, one per order at a time (see the module docstring)."""
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
                    aggregate_id=row.order_id,
                    event_type=row.kind,
                    payload=payload_of(row),
                    headers=_headers(row.headers),
                    attempts=row.attempts,
                    created_at=_utc(row.created_at),
                    lease_token=token,
                    claimed_at=_utc(row.claimed_at),
                    claims=row.claims,
                    suspect=row.last_error == unfinished_attempt(row.attempts - 1),
                )
                for row in rows
            ),
            key=lambda e: e.id,
        )

    def complete_many(self, events: Sequence[ClaimedEvent], now: datetime) -> set[int]:
        if not events:
            return set()
        dialect = self._c.dialect.name
        parameters = {"now": now, **_lease_parameters(dialect, events)}
        return set(precompiled.execute(self._c, _complete_many_statement(dialect), parameters).scalars())

    def complete_and_claim(
        self, finished: Sequence[ClaimedEvent], limit: int, lease: timedelta, now: datetime
    ) -> tuple[set[int], list[ClaimedEvent]]:
        """`complete_many(finished)`, then `claim(limit)`; one statement on PostgreSQL."""
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
        if not events:
            return set()
        dialect = self._c.dialect.name
        parameters = {
            **clock.parameters(now, lease_s=lease.total_seconds()),
            **_lease_parameters(dialect, events),
        }
        return set(precompiled.execute(self._c, _renew_statement(dialect), parameters).scalars())

    def _fenced(self, event: ClaimedEvent) -> Update:
        return update(relay).where(
            relay.c.id == event.id, relay.c.lease_token == event.lease_token, relay.c.status == PENDING
        )

    def reschedule(
        self, event: ClaimedEvent, delay_s: float, now: datetime, error: str | None, count_attempt: bool
    ) -> bool:
        """Back to PENDING, due `delay_s` from now (the database's clock); a deferral gives back
        the attempt its claim counted."""
        dialect = self._c.dialect.name
        values: dict[str, Any] = {
            "available_at": clock.later(dialect, "delay_s"),
            "lease_token": None,
            "locked_until": None,
            "updated_at": clock.now(dialect),
        }
        if not count_attempt:
            values["attempts"] = case((relay.c.attempts > 0, relay.c.attempts - 1), else_=0)
        if error is not None:
            values["last_error"] = error[:MAX_ERROR_CHARS]
        statement = self._fenced(event).values(**values)
        return bool(self._c.execute(statement, clock.parameters(now, delay_s=delay_s)).rowcount == 1)

    def bury(self, event: ClaimedEvent, error: str | None, now: datetime) -> bool:
        values: dict[str, Any] = {
            "status": DEAD,
            "lease_token": None,
            "locked_until": None,
            "updated_at": now,
        }
        if error is not None:
            values["last_error"] = error[:MAX_ERROR_CHARS]
        return bool(self._c.execute(self._fenced(event).values(**values)).rowcount == 1)

    def purge_done(self, older_than: datetime, batch: int) -> int:
        """Delete at most `batch` DONE rows last touched before `older_than`."""
        doomed = (
            select(relay.c.id)
            .where(relay.c.status == DONE, relay.c.updated_at < older_than)
            .order_by(relay.c.id)
            .limit(batch)
            .scalar_subquery()
        )
        return int(self._c.execute(delete(relay).where(relay.c.id.in_(doomed))).rowcount)

    def backlog(self, now: datetime) -> tuple[int, float]:
        """PENDING rows, and the age in seconds of the oldest one."""
        row = self._c.execute(
            select(func.count(), func.min(relay.c.created_at)).where(relay.c.status == PENDING)
        ).one()
        count, oldest = int(row[0]), row[1]
        if oldest is None:
            return count, 0.0
        return count, max((now - _utc(oldest)).total_seconds(), 0.0)

    def replay(self, event_id: int, now: datetime) -> bool:
        """Put a DEAD row back to PENDING with its attempts reset (an operator's call)."""
        statement = (
            update(relay)
            .where(relay.c.id == event_id, relay.c.status == DEAD)
            .values(status=PENDING, attempts=0, available_at=now, updated_at=now)
        )
        return bool(self._c.execute(statement).rowcount == 1)


class RelayUnitOfWork(UnitOfWork):
    """A transaction on the orders database that reaches the relay's queue as `outbox`, the name
    the dispatcher works with (`db.queue.QueueUnitOfWork`)."""

    outbox: RelayQueue

    def _started(self) -> None:
        self.outbox = RelayQueue(self.connection)


def _headers(raw: str) -> dict[str, str]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _utc(value: Any) -> datetime:
    """A time read back from a RETURNING expression or an aggregate (no column type on SQLite)."""
    moment: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
