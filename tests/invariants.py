"""DESIGN.md's invariants, checked from the database rows (tests, chaos runs and benchmarks).

`check_invariants` reads the orders database (orders, order_items, outbox_events) and the
inventory database (stock, stock_reservations), which may be the same, and fails with every
violation listed. Call it only once the service has settled: `wait_until(lambda: settled(url))`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, select

from db.engine import EngineSettings, make_engine
from db.tables import order_items, orders, outbox_events, stock, stock_reservations

SETTLED = frozenset({"VALIDATED", "FAILED", "CANCELLED"})
FINAL_EVENT_STATES = frozenset({"DONE", "DEAD"})


@dataclass
class Summary:
    """What the checked rows held: for the caller's own assertions."""

    orders_by_status: Counter[str] = field(default_factory=Counter)
    events_by_status: Counter[str] = field(default_factory=Counter)
    stock: dict[str, tuple[int, int]] = field(default_factory=dict)  # sku -> (available, reserved)
    active_reserved: dict[str, int] = field(default_factory=dict)  # sku -> sum of ACTIVE reservations


class InvariantViolation(AssertionError):
    pass


@contextmanager
def _engine(url: str | Engine) -> Iterator[Engine]:
    if isinstance(url, Engine):
        yield url
        return
    engine = make_engine(url, EngineSettings(pool_size=2, max_overflow=0))
    try:
        yield engine
    finally:
        engine.dispose()


def settled(orders_url: str | Engine) -> bool:
    """True once no order is PENDING and no outbox event is PENDING (a predicate for wait_until)."""
    with _engine(orders_url) as engine, engine.connect() as c:
        pending_orders = c.execute(
            select(func.count()).select_from(orders).where(orders.c.status == "PENDING")
        ).scalar_one()
        pending_events = c.execute(
            select(func.count()).select_from(outbox_events).where(outbox_events.c.status == "PENDING")
        ).scalar_one()
    return pending_orders == 0 and pending_events == 0


def check_invariants(
    orders_url: str | Engine, inventory_url: str | Engine, initial_stock: dict[str, int]
) -> Summary:
    """Assert DESIGN.md's invariants 1-3 on the rows; returns a summary of what was checked."""
    with _engine(orders_url) as orders_engine, orders_engine.connect() as c:
        order_rows = c.execute(select(orders.c.id, orders.c.status, orders.c.failure_reason)).all()
        item_rows = c.execute(select(order_items.c.order_id, order_items.c.sku, order_items.c.quantity)).all()
        event_rows = c.execute(
            select(
                outbox_events.c.id,
                outbox_events.c.aggregate_id,
                outbox_events.c.event_type,
                outbox_events.c.status,
                outbox_events.c.last_error,
            )
        ).all()
    with _engine(inventory_url) as inventory_engine, inventory_engine.connect() as c:
        stock_rows = c.execute(select(stock.c.sku, stock.c.available, stock.c.reserved)).all()
        reservation_rows = c.execute(
            select(
                stock_reservations.c.order_id,
                stock_reservations.c.sku,
                stock_reservations.c.quantity,
                stock_reservations.c.status,
            )
        ).all()

    problems: list[str] = []
    summary = Summary()

    # Invariant 1: stock is conserved, never negative, and `reserved` is what the reservations say.
    levels = {row.sku: (int(row.available), int(row.reserved)) for row in stock_rows}
    summary.stock = levels
    active_by_sku: dict[str, int] = defaultdict(int)
    active_by_order: dict[str, dict[str, int]] = defaultdict(dict)
    seen_reservations: Counter[tuple[str, str]] = Counter()
    for r in reservation_rows:
        seen_reservations[(r.order_id, r.sku)] += 1
        if r.status not in ("ACTIVE", "RELEASED"):
            problems.append(f"reservation {r.order_id}/{r.sku} has unknown status {r.status!r}")
        if r.quantity <= 0:
            problems.append(f"reservation {r.order_id}/{r.sku} has quantity {r.quantity}")
        if r.status == "ACTIVE":
            active_by_sku[r.sku] += r.quantity
            active_by_order[r.order_id][r.sku] = r.quantity
    summary.active_reserved = dict(active_by_sku)
    for key, times in seen_reservations.items():
        if times > 1:
            problems.append(f"reservation {key[0]}/{key[1]} exists {times} times")
    for sku, initial in initial_stock.items():
        if sku not in levels:
            problems.append(f"SKU {sku!r}: no stock row")
            continue
        available, _reserved = levels[sku]
        if initial != available + active_by_sku.get(sku, 0):
            problems.append(
                f"SKU {sku!r}: initial {initial} != available {available} + active reservations "
                f"{active_by_sku.get(sku, 0)}"
            )
    for sku, (available, reserved) in levels.items():
        if available < 0:
            problems.append(f"SKU {sku!r}: available {available} < 0 (oversold)")
        if reserved != active_by_sku.get(sku, 0):
            problems.append(
                f"SKU {sku!r}: reserved {reserved} != sum of active reservations {active_by_sku.get(sku, 0)}"
            )
    for sku in active_by_sku.keys() - levels.keys():
        problems.append(f"SKU {sku!r}: active reservations but no stock row")

    # Invariant 2: every order settled; VALIDATED <=> active reservations for exactly its items.
    items_by_order: dict[str, dict[str, int]] = defaultdict(dict)
    for item in item_rows:
        items_by_order[item.order_id][item.sku] = item.quantity
    for order in order_rows:
        summary.orders_by_status[order.status] += 1
        items = items_by_order.get(order.id, {})
        active = active_by_order.get(order.id, {})
        if order.status not in SETTLED:
            problems.append(f"order {order.id} is {order.status}, not settled")
        elif order.status == "VALIDATED":
            if active != items:
                problems.append(f"order {order.id} is VALIDATED with items {items} but active {active}")
        elif active:
            problems.append(
                f"order {order.id} is {order.status} but still holds active reservations {active}"
            )
        if order.status == "FAILED" and not order.failure_reason:
            problems.append(f"order {order.id} is FAILED without a reason")
    known_orders = {order.id for order in order_rows}
    for order_id, held in active_by_order.items():
        if order_id not in known_orders:
            problems.append(f"active reservations {held} belong to no order ({order_id})")
    # A reservation (active or released) is only ever of an item of its order, at its quantity.
    for r in reservation_rows:
        wanted = items_by_order.get(r.order_id, {}).get(r.sku)
        if r.order_id in known_orders and wanted != r.quantity:
            problems.append(
                f"reservation {r.order_id}/{r.sku} of {r.quantity} does not match the order item ({wanted})"
            )

    # Invariant 3: every outbox event ended DONE or DEAD (DEAD ones keep their error).
    for event in event_rows:
        summary.events_by_status[event.status] += 1
        if event.status not in FINAL_EVENT_STATES:
            problems.append(
                f"outbox event {event.id} ({event.event_type} of {event.aggregate_id}) is {event.status}"
            )
        elif event.status == "DEAD" and not event.last_error:
            problems.append(f"outbox event {event.id} is DEAD without last_error")
    created = Counter(e.aggregate_id for e in event_rows if e.event_type == "ORDER_CREATED")
    cancelled = Counter(e.aggregate_id for e in event_rows if e.event_type == "ORDER_CANCELLED")
    for order in order_rows:
        if created.get(order.id, 0) != 1:
            problems.append(f"order {order.id} has {created.get(order.id, 0)} ORDER_CREATED events, not 1")
        wanted_cancels = 1 if order.status == "CANCELLED" else 0
        if cancelled.get(order.id, 0) != wanted_cancels:
            problems.append(
                f"order {order.id} is {order.status} with {cancelled.get(order.id, 0)} ORDER_CANCELLED events"
            )

    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise InvariantViolation(f"{len(problems)} invariant violation(s):\n  {shown}{more}")
    return summary
