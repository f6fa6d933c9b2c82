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
exactly as the outbox's: both are a `db.queue.LeasedQueue`, which differ in their table and claim
rule. The dispatcher sees a row as a `ClaimedEvent` whose `event_type` is the kind (placed,
validated, ...) and whose `payload` is the row as JSON (`relay.messages` turns it into the
protobuf message).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import ColumnElement, FromClause, Table

from db.queue import DONE, LeasedQueue, QueueTable, utc
from db.tables import relay_events as relay
from db.unit_of_work import UnitOfWork


def _earlier_not_done(row: Table, earlier: FromClause) -> tuple[ColumnElement[bool], ...]:
    """A row of the same order with a lower version, PENDING or DEAD, holds a row back."""
    return (
        earlier.c.order_id == row.c.order_id,
        earlier.c.version < row.c.version,
        earlier.c.status != DONE,
    )


RELAY = QueueTable(
    relay,
    claimed=(
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
    ),
    holds_back=_earlier_not_done,
)


def payload_of(row: Any) -> str:
    """A claimed row as the JSON `payload` of its `ClaimedEvent` (read by `relay.messages`)."""
    value: dict[str, Any] = {
        "order_id": row.order_id,
        "version": int(row.version),
        "customer_id": row.customer_id,
        "status": row.order_status,
        "failure_reason": row.failure_reason,
        "occur_time": utc(row.occurred_at).isoformat(),
    }
    if row.placed_items:
        value["items"] = json.loads(row.placed_items)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class RelayQueue(LeasedQueue):
    """The relay's queue on one connection: what `db.queue.EventQueue` asks, and the
    housekeeping (purge, backlog, replay)."""

    queue = RELAY

    @staticmethod
    def _content(row: Any) -> tuple[str, str, str]:
        return row.order_id, row.kind, payload_of(row)


class RelayUnitOfWork(UnitOfWork):
    """A transaction on the orders database that reaches the relay's queue as `outbox`, the name
    the dispatcher works with (`db.queue.QueueUnitOfWork`)."""

    outbox: RelayQueue

    def _started(self) -> None:
        self.outbox = RelayQueue(self.session)
