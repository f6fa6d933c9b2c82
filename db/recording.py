"""Every change of an order recorded for the event relay, in the transaction of the change.

`RecordingOrdersUnitOfWork` is the orders unit of work of a process that runs with the relay on
(`--events-url`): the composition root hands it to PlaceOrder, CancelOrder, the saga and the
expiry sweep in place of `OrdersUnitOfWork`, and nothing else changes. With the relay off the
plain class is used, so the service writes exactly what it wrote before.

Where each change is recorded, always in the same transaction as the change itself, so that a
change is never committed without its event, nor an event without its change:

- placed, cancelled, expired: wherever an `ORDER_CREATED`, `ORDER_CANCELLED` or `ORDER_EXPIRED`
  outbox event is stored (the unit of work is told of every outbox row stored, by the outbox store
  or, for a placed order on PostgreSQL, after the one statement that stores order and event
  together);
- validated, failed: where the saga settles an order and completes its event (one order, or a
  batch), only for the orders that settled.

A record is one `INSERT ... SELECT` from the order's row as this transaction leaves it: the
version, status, failure reason and update time after the change; the statement follows the
order's own write, so one order's rows also get ids in version order. Headers are those of the
outbox event that carries the change (the correlation id, and whatever else the outbox puts in
them, such as trace context), or, for a settlement, those of the `ORDER_CREATED` event whose saga
settled it. After the commit the relay is woken (`on_recorded`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Select,
    String,
    Text,
    bindparam,
    func,
    insert,
    literal,
    select,
)
from sqlalchemy.dialects import postgresql

from db import clock
from db.backend import backend_of
from db.outbox import PENDING, ClaimedEvent
from db.tables import orders, relay_events
from db.unit_of_work import OrdersUnitOfWork
from domain.events import OrderCancelled, OrderExpired, OrderPlaced
from domain.model import OrderStatus, Settlement

PLACED, VALIDATED, FAILED, CANCELLED, EXPIRED = "placed", "validated", "failed", "cancelled", "expired"
KINDS = (PLACED, VALIDATED, FAILED, CANCELLED, EXPIRED)
# The outbox events that carry a change of an order, and the kind of change.
_OUTBOX_KINDS = {
    OrderPlaced.event_type: PLACED,
    OrderCancelled.event_type: CANCELLED,
    OrderExpired.event_type: EXPIRED,
}
_SETTLED_KINDS = {OrderStatus.VALIDATED: VALIDATED, OrderStatus.FAILED: FAILED}

_COLUMNS = (
    "order_id",
    "kind",
    "version",
    "customer_id",
    "order_status",
    "failure_reason",
    "occurred_at",
    "placed_items",
    "headers",
    "status",
    "attempts",
    "claims",
    "available_at",
    "created_at",
    "updated_at",
)


@dataclass(frozen=True)
class Record:
    """One change of an order to record: the rest is read from the order's row."""

    order_id: str
    kind: str
    headers: str  # JSON
    placed_items: str = ""  # JSON, for a placed order


def settled_kind(settlement: Settlement) -> str:
    return _SETTLED_KINDS[settlement.status]


def records_of(rows: Iterable[Mapping[str, Any]]) -> list[Record]:
    """The records of outbox rows (`OutboxStore.new_rows`) that carry a change of an order."""
    records = []
    for row in rows:
        kind = _OUTBOX_KINDS.get(row["event_type"])
        if kind is None:
            continue
        items = ""
        if kind == PLACED:
            items = json.dumps(json.loads(row["payload"])["items"], separators=(",", ":"), ensure_ascii=False)
        records.append(Record(row["aggregate_id"], kind, row["headers"], items))
    return records


@lru_cache(maxsize=2)
def _record_statement(dialect: str) -> Insert:
    """INSERT ... SELECT from the orders' rows: on PostgreSQL a batch through array parameters
    (`r_orders`, `r_kinds`, `r_items`, `r_headers`), elsewhere one record (`order_id`, `kind`,
    `placed_items`, `headers`) per execution."""
    now = clock.now(dialect)

    def from_order(kind: Any, placed_items: Any, headers: Any) -> Select[Any]:
        """The row of `_COLUMNS`: the order's, the record's, and a new PENDING event's."""
        return select(
            orders.c.id,
            kind,
            orders.c.version,
            orders.c.customer_id,
            orders.c.status,
            orders.c.failure_reason,
            orders.c.update_time,
            placed_items,
            headers,
            literal(PENDING),
            literal(0),
            literal(0),
            now,
            now,
            now,
        )

    if backend_of(dialect).one_statement_writes:
        wanted = (
            func.unnest(
                bindparam("r_orders", type_=postgresql.ARRAY(String)),
                bindparam("r_kinds", type_=postgresql.ARRAY(String)),
                bindparam("r_items", type_=postgresql.ARRAY(Text)),
                bindparam("r_headers", type_=postgresql.ARRAY(Text)),
            )
            .table_valued("order_id", "kind", "placed_items", "headers")
            .render_derived("w")
        )
        source = from_order(wanted.c.kind, wanted.c.placed_items, wanted.c.headers).join_from(
            wanted, orders, orders.c.id == wanted.c.order_id
        )
    else:
        source = from_order(
            bindparam("kind", type_=String),
            bindparam("placed_items", type_=Text),
            bindparam("headers", type_=Text),
        ).where(orders.c.id == bindparam("order_id", type_=String))
    return insert(relay_events).from_select([relay_events.c[name] for name in _COLUMNS], source)


def record(connection: Connection, records: Sequence[Record], now: datetime) -> int:
    """Insert the relay's rows of `records`; the number written (one per record whose order
    exists). One statement on PostgreSQL, one per record elsewhere."""
    if not records:
        return 0
    dialect = connection.dialect.name
    statement = _record_statement(dialect)
    if backend_of(dialect).one_statement_writes:
        parameters = {
            "r_orders": [r.order_id for r in records],
            "r_kinds": [r.kind for r in records],
            "r_items": [r.placed_items for r in records],
            "r_headers": [r.headers for r in records],
        }
        return int(connection.execute(statement, parameters).rowcount)
    written = 0
    for r in records:
        one: dict[str, Any] = {
            "order_id": r.order_id,
            "kind": r.kind,
            "placed_items": r.placed_items,
            "headers": r.headers,
        }
        written += int(connection.execute(statement, {**one, **clock.parameters(now)}).rowcount)
    return written


class RecordingOrdersUnitOfWork(OrdersUnitOfWork):
    """`OrdersUnitOfWork` that records every change of an order for the relay (see the module)."""

    def __init__(
        self, engine: Engine, *, on_recorded: Callable[[], None] = lambda: None, **options: Any
    ) -> None:
        super().__init__(engine, **options)
        self._on_recorded = on_recorded
        self._wakes = False

    def _events_stored(self, rows: Sequence[Mapping[str, Any]], now: datetime) -> None:
        self.record(records_of(rows), now)

    def record(self, records: Sequence[Record], now: datetime) -> None:
        """Record `records` in this transaction; the relay is woken after the commit."""
        if not records:
            return
        record(self.connection, records, now)
        if not self._wakes:
            self._wakes = True
            self.after_commit(self._on_recorded)

    def settle_and_complete(
        self, order_id: str, settlement: Settlement, event: ClaimedEvent, now: datetime
    ) -> tuple[bool, bool]:
        settled, completed = super().settle_and_complete(order_id, settlement, event, now)
        if settled and completed:
            self.record([Record(order_id, settled_kind(settlement), _json(event.headers))], now)
        return settled, completed

    def settle_and_complete_many(
        self, settlements: Sequence[tuple[Settlement, ClaimedEvent]], now: datetime
    ) -> dict[int, tuple[bool, bool]]:
        answers = super().settle_and_complete_many(settlements, now)
        self.record(
            [
                Record(event.aggregate_id, settled_kind(settlement), _json(event.headers))
                for settlement, event in settlements
                if answers[event.id] == (True, True)
            ],
            now,
        )
        return answers


def _json(headers: Mapping[str, str]) -> str:
    return json.dumps(dict(headers), ensure_ascii=False, separators=(",", ":"))
