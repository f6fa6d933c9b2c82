"""The set-based saga's statements, on both backends: a batch's reservation in one inventory
transaction (`StockRepository.reserve_many`) and its settlement in one orders transaction
(`OrdersUnitOfWork.settle_and_complete_many`), each order fenced and decided on its own. On
PostgreSQL each is a few statements for the whole batch; on SQLite, whose writer holds the whole
database, a statement per order where PostgreSQL takes arrays, with the same outcomes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from functools import partial

import pytest
from sqlalchemy import Engine, select, update

from db.engine import make_engine
from db.inventory import InventoryUnitOfWork
from db.outbox import DONE, PENDING, ClaimedEvent
from db.tables import orders, reservation_fences
from db.unit_of_work import OrdersUnitOfWork
from domain.allocation import ReservationRequest
from domain.errors import ConflictError
from domain.fencing import Fence
from domain.inventory import Reserved, Superseded, insufficient_stock, unknown_sku
from domain.model import Order, OrderItem, Settlement, utcnow
from saga.inventory import InventoryParticipant
from tests.integration.test_saga_statements import (
    event_row,
    order_row,
    reservations,
    set_stock,
    statements,
    stock_levels,
)


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_url)
    yield engine
    engine.dispose()


def on_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def request(n: int, *items: tuple[str, int], claim: int = 1) -> ReservationRequest:
    return ReservationRequest(f"order-{n}", tuple(OrderItem(s, q) for s, q in items), Fence(n, claim))


def reserve_many(
    engine: Engine, requests: list[ReservationRequest], check_first: bool = False
) -> dict[str, object]:
    with InventoryUnitOfWork(engine) as uow:
        outcomes = uow.stock.reserve_many(requests, utcnow(), check_first=check_first)
        uow.commit()
    return dict(outcomes)


def closed_reasons(engine: Engine) -> dict[str, str | None]:
    f = reservation_fences.c
    with engine.connect() as connection:
        rows = connection.execute(select(f.order_id, f.closed_reason))
        return {row.order_id: row.closed_reason for row in rows}


def test_a_batch_reserves_order_by_order_in_one_transaction_and_closes_the_orders_it_refuses(engine):
    set_stock(engine, {"HOT": 3, "B": 5})
    batch = [
        request(1, ("HOT", 2)),
        request(2, ("HOT", 2), ("B", 1)),  # HOT has 1 left: refused whole, B untouched
        request(3, ("B", 1), ("HOT", 1)),
        request(4, ("GHOST", 1), ("B", 1)),
        request(5, ("B", 9)),
    ]

    with statements(engine) as sent:
        outcomes = reserve_many(engine, batch)

    assert outcomes == {
        "order-1": Reserved(),
        "order-2": insufficient_stock("HOT", 2, 1),
        "order-3": Reserved(),
        "order-4": unknown_sku("GHOST"),
        "order-5": insufficient_stock("B", 9, 4),
    }
    if on_postgres(engine):
        assert len(sent) == 3, "fences, the locked stock rows, the writes: " + "\n".join(sent)
    else:  # the fences, the levels, the rows, the decrements, a reason per refused order
        assert len(sent) == 4 + 3, "\n".join(sent)
    assert stock_levels(engine, ["HOT", "B"]) == {"HOT": (0, 3), "B": (4, 1)}
    assert reservations(engine) == [
        ("order-1", "HOT", 2, "ACTIVE"),
        ("order-2", "B", 1, "RELEASED"),
        ("order-2", "HOT", 2, "RELEASED"),
        ("order-3", "B", 1, "ACTIVE"),
        ("order-3", "HOT", 1, "ACTIVE"),
        ("order-4", "B", 1, "RELEASED"),
        ("order-4", "GHOST", 1, "RELEASED"),
        ("order-5", "B", 9, "RELEASED"),
    ]
    assert closed_reasons(engine) == {
        "order-1": None,
        "order-2": insufficient_stock("HOT", 2, 1).reason,
        "order-3": None,
        "order-4": unknown_sku("GHOST").reason,
        "order-5": insufficient_stock("B", 9, 4).reason,
    }


def test_an_order_a_newer_step_wrote_for_is_superseded_and_the_rest_of_the_batch_goes_on(engine):
    set_stock(engine, {"A": 10})
    with InventoryUnitOfWork(engine) as uow:  # the order's cancel (a later event) wrote first
        assert uow.stock.fence("order-2", Fence(99, 1), utcnow())
        uow.commit()

    outcomes = reserve_many(engine, [request(1, ("A", 1)), request(2, ("A", 2)), request(3, ("A", 3))])

    assert outcomes == {"order-1": Reserved(), "order-2": Superseded(), "order-3": Reserved()}
    assert stock_levels(engine, ["A"]) == {"A": (6, 4)}
    assert [row[0] for row in reservations(engine)] == ["order-1", "order-3"]


def test_a_redelivered_batch_reserves_nothing_more_and_a_closed_order_keeps_its_reason(engine):
    set_stock(engine, {"A": 2})
    first = [request(1, ("A", 1)), request(2, ("A", 5)), request(3, ("A", 1))]
    assert reserve_many(engine, first) == {
        "order-1": Reserved(),
        "order-2": insufficient_stock("A", 5, 1),
        "order-3": Reserved(),
    }
    set_stock(engine, {"A": 10})  # more stock meanwhile: still nothing more for these orders
    again = [replace(r, fence=Fence(r.fence.event_id, 2)) for r in first] + [request(4, ("A", 4))]

    with pytest.raises(ConflictError):  # unchecked, the redelivered keys fail the insert
        reserve_many(engine, again)
    outcomes = reserve_many(engine, again, check_first=True)

    assert outcomes == {
        "order-1": Reserved(fresh=False),
        "order-2": insufficient_stock("A", 5, 1),
        "order-3": Reserved(fresh=False),
        "order-4": Reserved(),
    }
    assert stock_levels(engine, ["A"]) == {"A": (6, 6)}, "set_available keeps what is reserved"
    assert [(r[0], r[3]) for r in reservations(engine)] == [
        ("order-1", "ACTIVE"),
        ("order-2", "RELEASED"),
        ("order-3", "ACTIVE"),
        ("order-4", "ACTIVE"),
    ]


def test_the_participant_sends_a_redelivered_batch_down_the_checked_path(engine):
    participant = InventoryParticipant(partial(InventoryUnitOfWork, engine))
    set_stock(engine, {"A": 5})
    assert participant.reserve("order-1", (OrderItem("A", 2),), Fence(1, 1)) == Reserved()

    outcomes = participant.reserve_many([request(1, ("A", 2)), request(2, ("A", 2))])

    assert outcomes == {"order-1": Reserved(fresh=False), "order-2": Reserved()}
    assert participant.conflict_retries == 1, "the first try skipped the check (claims of 1)"
    assert stock_levels(engine, ["A"]) == {"A": (1, 4)}


# Settle and complete a batch.


def placed_and_claimed(engine: Engine, count: int) -> list[ClaimedEvent]:
    now = utcnow()
    with OrdersUnitOfWork(engine) as uow:
        for n in range(count):
            order, placed = Order.place(f"customer-{n}", (OrderItem("A", 1),), now=now)
            uow.add_order(order, None, [placed], None)
        uow.commit()
    with OrdersUnitOfWork(engine) as uow:
        claimed = uow.outbox.claim(count, timedelta(seconds=60), now)
        uow.commit()
    return claimed


def test_settle_and_complete_many_settles_each_leased_order_with_its_event_in_one_transaction(engine):
    events = placed_and_claimed(engine, 4)
    lost = replace(events[1], lease_token="another-process-token")
    with OrdersUnitOfWork(engine) as uow:  # the third order was cancelled meanwhile
        cancel = update(orders).where(orders.c.id == events[2].aggregate_id)
        uow.connection.execute(cancel.values(status="CANCELLED", version=2))
        uow.commit()
    settlements = [
        (Settlement.validated(), events[0]),
        (Settlement.validated(), lost),
        (Settlement.validated(), events[2]),
        (Settlement.failed("insufficient stock for SKU 'A'"), events[3]),
    ]

    with statements(engine) as sent, OrdersUnitOfWork(engine) as uow:
        answers = uow.settle_and_complete_many(settlements, utcnow())
        uow.commit()

    assert answers == {
        events[0].id: (True, True),
        events[1].id: (False, False),
        events[2].id: (True, False),
        events[3].id: (True, True),
    }
    # SQLite: the leases held, a settle per settlement (VALIDATED, FAILED for one reason), the completions
    assert len(sent) == (1 if on_postgres(engine) else 1 + 2 + 1), sent
    statuses = [(order_row(engine, e.aggregate_id).status, event_row(engine, e.id).status) for e in events]
    assert statuses == [
        ("VALIDATED", DONE),
        ("PENDING", PENDING),
        ("CANCELLED", PENDING),
        ("FAILED", DONE),
    ]
    assert order_row(engine, events[3].aggregate_id).failure_reason == "insufficient stock for SKU 'A'"
    assert order_row(engine, events[0].aggregate_id).version == 2
    assert event_row(engine, events[1].id).lease_token == events[1].lease_token, "untouched"
