"""The saga's two statements on PostgreSQL, and the per-statement path on SQLite, behave the same.

On PostgreSQL a first delivery's reservation is one statement (`StockRepository.reserve`) and the
settle with the event's completion is another (`OrdersUnitOfWork.settle_and_complete`); SQLite has
no data-modifying WITH and runs the statements they replace. Every case runs on both backends:
what is reserved, what a rejection says, that a redelivery takes nothing more, that concurrent
orders on shared SKUs never oversell nor deadlock, and that the settle is fenced on the lease.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from db.engine import EngineSettings, make_engine
from db.inventory import InventoryUnitOfWork
from db.outbox import DONE, PENDING, ClaimedEvent
from db.tables import orders, outbox_events, stock_reservations
from db.unit_of_work import OrdersUnitOfWork
from domain.fencing import Fence
from domain.inventory import Rejected, ReservationOutcome, Reserved, insufficient_stock, unknown_sku
from domain.model import Order, OrderItem, Settlement, utcnow
from saga.inventory import InventoryParticipant, InventorySaga, SagaSettings
from saga.resilience import ConcurrentCircuitBreaker, Guard, RateLimiter
from saga.verdicts import Completed

THREADS = 8
ORDERS_PER_THREAD = 50
SHARED_SKUS = ("HOT-A", "HOT-B", "HOT-C", "HOT-D")
SHARED_STOCK = 200  # per SKU: about half the demand of 400 orders of 2-3 items (1-3 each)


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    """Both schemas in one fresh database of each backend, with room for every thread."""
    engine = make_engine(migrated_url, EngineSettings(pool_size=THREADS + 2))
    yield engine
    engine.dispose()


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


@contextmanager
def _recorded(engine: Engine, pick: Callable[[str], str | None]) -> Iterator[list[str]]:
    """What `pick` makes of each SQL string sent on `engine` inside the block (None: left out)."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        picked = pick(statement)
        if picked is not None:
            seen.append(picked)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def statements(engine: Engine) -> AbstractContextManager[list[str]]:
    """The SQL statements sent on `engine` inside the block (BEGIN and COMMIT are not statements)."""

    def statement_of(sql: str) -> str | None:
        # On PostgreSQL the unit of work sends BEGIN in front of the first statement, and COMMIT
        # and ROLLBACK as statements of their own; SQLite's BEGIN is a statement of its own.
        if sql.startswith("BEGIN; "):
            sql = sql[len("BEGIN; ") :]
        return None if sql.split(None, 1)[0].upper().rstrip(";") in ("BEGIN", "COMMIT", "ROLLBACK") else sql

    return _recorded(engine, statement_of)


def transactions(engine: Engine) -> AbstractContextManager[list[str]]:
    """On PostgreSQL, the first statement of each transaction sent on `engine` inside the block
    (the unit of work sends BEGIN in front of it; COMMIT and ROLLBACK go on the driver's cursor)."""
    return _recorded(engine, lambda sql: sql if sql.startswith("BEGIN; ") else None)


def set_stock(engine: Engine, levels: dict[str, int]) -> None:
    with InventoryUnitOfWork(engine) as uow:
        for sku, available in levels.items():
            uow.stock.set_available(sku, available, utcnow())
        uow.commit()


def stock_levels(engine: Engine, skus: tuple[str, ...] | list[str]) -> dict[str, tuple[int, int]]:
    """(available, reserved) per SKU."""
    with InventoryUnitOfWork(engine, write=False) as uow:
        levels = {sku: uow.stock.get(sku) for sku in skus}
    return {sku: (level.available, level.reserved) for sku, level in levels.items() if level is not None}


def stock_versions(engine: Engine, skus: list[str]) -> dict[str, int]:
    with InventoryUnitOfWork(engine, write=False) as uow:
        return {sku: level.version for sku in skus if (level := uow.stock.get(sku)) is not None}


def reservations(engine: Engine) -> list[tuple[str, str, int, str]]:
    """Every reservation row as (order, SKU, quantity, status)."""
    r = stock_reservations.c
    with engine.connect() as connection:
        rows = connection.execute(select(r.order_id, r.sku, r.quantity, r.status).order_by(r.order_id, r.sku))
        return [tuple(row) for row in rows]


def first_delivery(engine: Engine, order_id: str, items: tuple[OrderItem, ...]) -> ReservationOutcome:
    """`reserve` as the participant's first try runs it: no check, commit only a fresh Reserved."""
    with InventoryUnitOfWork(engine) as uow:
        outcome = uow.stock.reserve(order_id, items, utcnow(), check_first=False)
        if isinstance(outcome, Reserved) and outcome.fresh:
            uow.commit()
    return outcome


# Reserve.


@pytest.mark.parametrize(
    "items",
    [
        (OrderItem("SKU-B", 2),),
        (OrderItem("SKU-C", 1), OrderItem("SKU-A", 4)),
        (OrderItem("SKU-B", 3), OrderItem("SKU-C", 10), OrderItem("SKU-A", 1)),
    ],
    ids=["one-item", "two-items", "three-items"],
)
def test_a_reservation_takes_exactly_the_stock_and_books_active_rows(engine, items):
    set_stock(engine, {"SKU-A": 5, "SKU-B": 7, "SKU-C": 10, "SKU-D": 3})

    with statements(engine) as sent:
        outcome = first_delivery(engine, "order-1", items)

    assert outcome == Reserved(fresh=True)
    wanted = {item.sku: item.quantity for item in items}
    initial = {"SKU-A": 5, "SKU-B": 7, "SKU-C": 10, "SKU-D": 3}
    assert stock_levels(engine, list(initial)) == {
        sku: (level - wanted.get(sku, 0), wanted.get(sku, 0)) for sku, level in initial.items()
    }
    assert reservations(engine) == sorted(("order-1", sku, q, "ACTIVE") for sku, q in wanted.items())
    if is_postgres(engine):
        assert len(sent) == 1, sent
    else:
        assert len(sent) == 1 + len(items), "SQLite keeps the insert and one decrement per item"


def test_one_short_item_reserves_nothing_and_names_the_first_short_sku(engine):
    set_stock(engine, {"SKU-A": 5, "SKU-B": 3, "SKU-C": 1})
    # Listed out of SKU order, two short: the first short one in SKU order is reported.
    items = (OrderItem("SKU-C", 2), OrderItem("SKU-A", 1), OrderItem("SKU-B", 4))

    outcome = first_delivery(engine, "order-short", items)

    assert outcome == insufficient_stock("SKU-B", 4, 3)
    assert stock_levels(engine, ["SKU-A", "SKU-B", "SKU-C"]) == {
        "SKU-A": (5, 0),
        "SKU-B": (3, 0),
        "SKU-C": (1, 0),
    }
    assert reservations(engine) == []


@pytest.mark.parametrize(
    ("items", "refusal"),
    [
        (
            (OrderItem("SKU-C", 2), OrderItem("SKU-A", 1), OrderItem("SKU-B", 4)),
            insufficient_stock("SKU-B", 4, 3),
        ),
        ((OrderItem("SKU-A", 1), OrderItem("NO-SUCH", 1)), unknown_sku("NO-SUCH")),
    ],
    ids=["short", "unknown"],
)
def test_a_fenced_refusal_gives_back_what_it_took_and_closes_the_order_in_the_same_transaction(
    engine, items, refusal
):
    initial = {"SKU-A": 5, "SKU-B": 3, "SKU-C": 1}
    set_stock(engine, initial)
    versions = stock_versions(engine, list(initial))
    participant = InventoryParticipant(partial(InventoryUnitOfWork, engine))

    with statements(engine) as sent, transactions(engine) as begun:
        outcome = participant.reserve("order-refused", items, Fence(1, 1))

    assert outcome == refusal
    # SKU-A was taken before the refusal (first in SKU order) and is back, at its version too.
    assert stock_levels(engine, list(initial)) == {sku: (level, 0) for sku, level in initial.items()}
    assert stock_versions(engine, list(initial)) == versions
    assert reservations(engine) == sorted(("order-refused", i.sku, i.quantity, "RELEASED") for i in items)
    if is_postgres(engine):
        assert (len(sent), len(begun)) == (2, 1), "the reservation and the close, in one transaction"
    # Closed: a later step of the order is refused for the same reason, even with stock enough.
    set_stock(engine, {"SKU-B": 100, "SKU-C": 100, "NO-SUCH": 100})
    assert participant.reserve("order-refused", items, Fence(1, 2)) == refusal
    assert stock_levels(engine, ["SKU-A", "SKU-B"]) == {"SKU-A": (5, 0), "SKU-B": (100, 0)}


def test_an_unfenced_refusal_writes_nothing(engine):
    set_stock(engine, {"SKU-A": 5, "SKU-B": 3})
    participant = InventoryParticipant(partial(InventoryUnitOfWork, engine))

    outcome = participant.reserve("order-unfenced", (OrderItem("SKU-A", 1), OrderItem("SKU-B", 4)))

    assert outcome == insufficient_stock("SKU-B", 4, 3)
    assert stock_levels(engine, ["SKU-A", "SKU-B"]) == {"SKU-A": (5, 0), "SKU-B": (3, 0)}
    assert reservations(engine) == []


def test_an_unknown_sku_is_reported_as_unknown_and_reserves_nothing(engine):
    set_stock(engine, {"SKU-A": 5})

    outcome = first_delivery(engine, "order-unknown", (OrderItem("SKU-A", 1), OrderItem("NO-SUCH", 1)))

    assert outcome == unknown_sku("NO-SUCH")
    assert stock_levels(engine, ["SKU-A"]) == {"SKU-A": (5, 0)}
    assert reservations(engine) == []


def test_a_redelivery_is_reserved_again_and_takes_nothing_more(engine):
    participant = InventoryParticipant(partial(InventoryUnitOfWork, engine))
    set_stock(engine, {"SKU-A": 5, "SKU-B": 5})
    items = (OrderItem("SKU-B", 2), OrderItem("SKU-A", 1))
    assert participant.reserve("order-again", items) == Reserved(fresh=True)

    again = participant.reserve("order-again", items)

    assert again == Reserved(fresh=False)
    assert participant.conflict_retries == 1, "the key conflict sent it down the checked path"
    assert stock_levels(engine, ["SKU-A", "SKU-B"]) == {"SKU-A": (4, 1), "SKU-B": (3, 2)}
    assert reservations(engine) == [
        ("order-again", "SKU-A", 1, "ACTIVE"),
        ("order-again", "SKU-B", 2, "ACTIVE"),
    ]


def test_concurrent_orders_on_shared_skus_never_oversell_nor_deadlock(engine):
    """8 threads place 50 orders each, of 2-3 of 4 shared SKUs listed in any order."""
    set_stock(engine, dict.fromkeys(SHARED_SKUS, SHARED_STOCK))
    participant = InventoryParticipant(partial(InventoryUnitOfWork, engine))
    rng = random.Random(7)
    orders_ = {
        f"order-{t}-{n}": tuple(
            OrderItem(sku, rng.randint(1, 3)) for sku in rng.sample(SHARED_SKUS, rng.randint(2, 3))
        )
        for t in range(THREADS)
        for n in range(ORDERS_PER_THREAD)
    }
    start = threading.Barrier(THREADS)

    def run(thread: int) -> dict[str, ReservationOutcome]:
        start.wait()
        mine = [order_id for order_id in orders_ if order_id.startswith(f"order-{thread}-")]
        return {order_id: participant.reserve(order_id, orders_[order_id]) for order_id in mine}

    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = {k: v for part in pool.map(run, range(THREADS)) for k, v in part.items()}

    assert participant.conflict_retries == 0, "a first delivery never conflicts (a deadlock would)"
    reserved = [order_id for order_id, outcome in outcomes.items() if outcome == Reserved(fresh=True)]
    rejected = [order_id for order_id, outcome in outcomes.items() if isinstance(outcome, Rejected)]
    assert len(reserved) + len(rejected) == THREADS * ORDERS_PER_THREAD
    assert reserved and rejected, "the stock must have run out part way"
    assert all("insufficient stock" in outcomes[order_id].reason for order_id in rejected)  # type: ignore[union-attr]
    taken: Counter[str] = Counter()
    for order_id in reserved:
        for item in orders_[order_id]:
            taken[item.sku] += item.quantity
    levels = stock_levels(engine, SHARED_SKUS)
    for sku in SHARED_SKUS:
        available, held = levels[sku]
        assert available >= 0 and available + held == SHARED_STOCK, (sku, levels[sku])
        assert held == taken[sku], (sku, held, taken[sku])
    expected_rows = sorted(
        (order_id, item.sku, item.quantity, "ACTIVE") for order_id in reserved for item in orders_[order_id]
    )
    assert reservations(engine) == expected_rows, "every reserved order holds all its items, no other"


# Settle and complete.


def placed_and_claimed(engine: Engine) -> tuple[Order, ClaimedEvent]:
    """A PENDING order and its ORDER_CREATED event, claimed under a lease."""
    now = utcnow()
    order, placed = Order.place("customer-1", (OrderItem("SKU-A", 1),), now=now)
    with OrdersUnitOfWork(engine) as uow:
        uow.add_order(order, None, [placed], None)
        uow.commit()
    with OrdersUnitOfWork(engine) as uow:
        [claimed] = uow.outbox.claim(1, timedelta(seconds=60), now)
        uow.commit()
    return order, claimed


def order_row(engine: Engine, order_id: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(select(orders).where(orders.c.id == order_id)).one()


def event_row(engine: Engine, event_id: int) -> Any:
    with engine.connect() as connection:
        return connection.execute(select(outbox_events).where(outbox_events.c.id == event_id)).one()


@pytest.mark.parametrize(
    "settlement",
    [Settlement.validated(), Settlement.failed("insufficient stock")],
    ids=["validated", "failed"],
)
def test_settle_and_complete_settles_the_order_and_marks_the_event_done(engine, settlement):
    order, claimed = placed_and_claimed(engine)
    now = utcnow()

    with statements(engine) as sent, OrdersUnitOfWork(engine) as uow:
        result = uow.settle_and_complete(order.order_id, settlement, claimed, now)
        uow.commit()

    assert result == (True, True)
    row = order_row(engine, order.order_id)
    assert (row.status, row.version, row.failure_reason) == (settlement.status.value, 2, settlement.reason)
    assert row.update_time == now
    done = event_row(engine, claimed.id)
    assert (done.status, done.lease_token, done.locked_until, done.updated_at) == (DONE, None, None, now)
    assert len(sent) == (1 if is_postgres(engine) else 2), sent


def test_settle_and_complete_with_a_lost_lease_settles_but_does_not_complete(engine):
    order, claimed = placed_and_claimed(engine)
    before = event_row(engine, claimed.id)
    taken_over = replace(claimed, lease_token="another-process-token")

    with OrdersUnitOfWork(engine) as uow:
        result = uow.settle_and_complete(order.order_id, Settlement.validated(), taken_over, utcnow())
        # no commit: the caller rolls the settle back

    assert result == (True, False)
    row = order_row(engine, order.order_id)
    assert (row.status, row.version) == ("PENDING", 1)
    assert tuple(event_row(engine, claimed.id)) == tuple(before)


def test_settle_and_complete_of_an_order_no_longer_pending_touches_nothing(engine):
    order, claimed = placed_and_claimed(engine)
    cancelled, _ = order.cancel()
    with OrdersUnitOfWork(engine) as uow:
        assert uow.orders.save(cancelled)
        uow.commit()
    before = event_row(engine, claimed.id)

    with OrdersUnitOfWork(engine) as uow:
        result = uow.settle_and_complete(order.order_id, Settlement.validated(), claimed, utcnow())
        uow.commit()

    assert result == (False, False)
    row = order_row(engine, order.order_id)
    assert (row.status, row.version) == ("CANCELLED", 2)
    after = event_row(engine, claimed.id)
    assert tuple(after) == tuple(before)
    assert (after.status, after.lease_token) == (PENDING, claimed.lease_token)


# The whole happy path.


def saga_on(engine: Engine) -> InventorySaga:
    guard = Guard(
        ConcurrentCircuitBreaker(slow_call_s=60.0, fail_max=5, reset_timeout=1.0, name="statements"),
        RateLimiter("100000/second"),
    )
    return InventorySaga(
        partial(OrdersUnitOfWork, engine),
        InventoryParticipant(partial(InventoryUnitOfWork, engine)),
        guard,
        SagaSettings(),
    )


def test_an_order_created_event_validates_the_order_in_two_statements_on_postgres(engine):
    set_stock(engine, {"SKU-A": 3})
    order, claimed = placed_and_claimed(engine)
    handler: Callable[[ClaimedEvent], Any] = saga_on(engine).handlers()["ORDER_CREATED"]

    with statements(engine) as sent:
        verdict = handler(claimed)

    assert verdict == Completed()
    assert order_row(engine, order.order_id).status == "VALIDATED"
    assert event_row(engine, claimed.id).status == DONE
    assert stock_levels(engine, ["SKU-A"]) == {"SKU-A": (2, 1)}
    # On PostgreSQL the fence rides in the reservation statement; SQLite sends it first: fence,
    # reservation insert, decrement, settle, completion.
    assert len(sent) == (2 if is_postgres(engine) else 5), sent


def test_a_refused_order_is_closed_and_failed_in_two_transactions_on_postgres(engine):
    set_stock(engine, {"SKU-A": 0})
    order, claimed = placed_and_claimed(engine)
    handler: Callable[[ClaimedEvent], Any] = saga_on(engine).handlers()["ORDER_CREATED"]

    with statements(engine) as sent, transactions(engine) as begun:
        verdict = handler(claimed)

    assert verdict == Completed()
    row = order_row(engine, order.order_id)
    assert (row.status, row.failure_reason) == ("FAILED", insufficient_stock("SKU-A", 1, 0).reason)
    assert event_row(engine, claimed.id).status == DONE
    assert reservations(engine) == [(order.order_id, "SKU-A", 1, "RELEASED")]
    assert stock_levels(engine, ["SKU-A"]) == {"SKU-A": (0, 0)}
    if is_postgres(engine):
        # The reservation and its close in the inventory's transaction, the settle in the orders'.
        assert (len(sent), len(begun)) == (3, 2), sent
