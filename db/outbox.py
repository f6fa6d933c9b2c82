"""The outbox store: events written with the change that raised them, claimed under a lease.

A queue of `db.queue` (claim, renewal and the fenced writes are `LeasedQueue`'s), whose claim rule
keeps per-order ordering: a row waits while an earlier PENDING event of the same aggregate exists
(a DEAD one no longer holds the order back). What is the outbox's own: storing events with the
change that raised them, already leased for a hand-off (`Lease`), and the rows as an operator sees
them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Table, insert, select

from db.backend import backend_of
from db.chained import DB_NOW, DbLater, insert_together
from db.driver import Statements
from db.queue import DEAD as DEAD
from db.queue import DONE as DONE
from db.queue import PENDING as PENDING
from db.queue import ClaimedEvent as ClaimedEvent
from db.queue import LeasedQueue, QueueTable, headers_of
from db.queue import done_values as done_values
from db.tables import outbox_events as outbox
from domain import correlation
from domain.events import DomainEvent


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


def _earlier_pending(row: Table, earlier: FromClause) -> tuple[ColumnElement[bool], ...]:
    """An earlier PENDING event of the same aggregate holds a row back."""
    return (
        earlier.c.aggregate_id == row.c.aggregate_id,
        earlier.c.status == PENDING,
        earlier.c.id < row.c.id,
    )


OUTBOX = QueueTable(
    outbox,
    claimed=(
        outbox.c.id,
        outbox.c.aggregate_id,
        outbox.c.event_type,
        outbox.c.payload,
        outbox.c.headers,
        outbox.c.attempts,
        outbox.c.claims,
        outbox.c.created_at,
        outbox.c.last_error,
    ),
    holds_back=_earlier_pending,
)


# Told of the rows (`OutboxStore.new_rows`) stored, and their time, in the transaction that stores them.
StoredHook = Callable[[Sequence[Mapping[str, Any]], datetime], None]


class OutboxStore(LeasedQueue):
    """The outbox on one connection: a `LeasedQueue` that also stores events (telling `on_stored`)."""

    queue = OUTBOX

    def __init__(self, connection: Statements, on_stored: StoredHook | None = None) -> None:
        super().__init__(connection)
        self._on_stored = on_stored

    @staticmethod
    def _content(row: Any) -> tuple[str, str, str]:
        return row.aggregate_id, row.event_type, row.payload

    def add(
        self,
        events: Iterable[DomainEvent],
        correlation_id: str | None,
        now: datetime,
        lease: Lease | None = None,
    ) -> list[ClaimedEvent]:
        """Store `events`; with a `lease`, already leased, and returned as claimed (else [])."""
        rows = self.new_rows(events, correlation_id, now, lease, self._c.dialect.name)
        if not rows:
            return []
        claimed: list[ClaimedEvent] = []
        if lease is None:
            insert_together(self._c, [(outbox, rows)])
        else:  # its RETURNING gives one key: one statement a row
            ids = [insert_together(self._c, [(outbox, [row])], returning=True)[0] for row in rows]
            claimed = self.leased(rows, ids, lease, now)
        if self._on_stored is not None:
            self._on_stored(rows, now)
        return claimed

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
                headers=headers_of(row["headers"]),
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
