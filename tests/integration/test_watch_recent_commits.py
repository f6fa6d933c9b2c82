"""WatchOrder takes what this process has just committed instead of reading it back (issue 17), on
both backends: a watch opened right after PlaceOrder starts from the placed order, a cancel or the
saga's settle reaches it as committed, with no read of the order; a change this process was only
told of (another process's notification) and one older than the recent window are read from the
database, so a watcher never misses a newer version."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial

import pytest
from sqlalchemy import update

from application.orders import OrderApplication
from application.paging import PageTokenCodec
from application.watching import OrderWatcher
from db.inventory import InventoryUnitOfWork
from db.tables import orders
from db.unit_of_work import OrdersUnitOfWork
from domain.model import Order, OrderItem, OrderStatus, Settlement, utcnow
from domain.validation import PlaceOrderCommand
from saga.signals import CommitSignals, OrderChanges, WakeUp
from tests.support import wait_until


class Recorded:
    """A WatchCall that keeps what was sent and how the call ended."""

    def __init__(self) -> None:
        self.sent: list[Order] = []
        self.ended = threading.Event()
        self.error: Exception | None = None

    def send(self, order: Order) -> bool:
        self.sent.append(order)
        return True

    def end(self, error: Exception | None) -> None:
        self.error = error
        self.ended.set()

    def on_done(self, callback: Callable[[], None]) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def changes(clock: Clock) -> OrderChanges:
    return OrderChanges(recent_s=2.0, clock=clock)


@pytest.fixture
def app(engine, changes: OrderChanges) -> OrderApplication:
    signals = CommitSignals(WakeUp(), changes)
    return OrderApplication(
        partial(OrdersUnitOfWork, engine), partial(InventoryUnitOfWork, engine), PageTokenCodec(b"k"), signals
    )


@pytest.fixture
def reads(app: OrderApplication) -> list[str]:
    return []


@pytest.fixture
def watcher(app: OrderApplication, changes: OrderChanges, reads: list[str]) -> Iterator[OrderWatcher]:
    def load(order_id: str) -> Order:
        reads.append(order_id)
        return app.get_order(order_id)

    watcher = OrderWatcher(load, changes, max_lifetime_s=60, safety_poll_s=30)
    yield watcher
    watcher.close()


def states(call: Recorded) -> list[tuple[OrderStatus, int]]:
    return [(order.status, order.version) for order in call.sent]


def place(app: OrderApplication) -> Order:
    return app.place_order(PlaceOrderCommand("alice", (OrderItem("SKU-1", 1),), None))


def test_a_watch_after_place_and_a_cancel_read_nothing(app, watcher, reads) -> None:
    order = place(app)
    call = Recorded()
    watcher.open(order.order_id, call)
    cancelled = app.cancel_order(order.order_id, None)

    assert call.ended.wait(10)
    assert call.error is None
    assert states(call) == [(OrderStatus.PENDING, 1), (OrderStatus.CANCELLED, 2)]
    assert call.sent[-1] == cancelled
    assert reads == []


def test_a_settle_reaches_the_watch_as_the_database_has_it(app, watcher, changes, engine, reads) -> None:
    """The saga settles without reading the order: the watch gets the placed order settled in
    memory, which must be what a read would have returned."""
    order = place(app)
    call = Recorded()
    watcher.open(order.order_id, call)
    settlement, now = Settlement.failed("insufficient stock for SKU 'SKU-1'"), utcnow()
    with OrdersUnitOfWork(engine) as uow:
        assert uow.orders.settle_pending(order.order_id, settlement, now)
        uow.commit()
    CommitSignals(WakeUp(), changes).order_settled(order.order_id, settlement, now)

    assert call.ended.wait(10)
    assert states(call) == [(OrderStatus.PENDING, 1), (OrderStatus.FAILED, 2)]
    assert reads == []
    assert call.sent[-1] == app.get_order(order.order_id)


def test_a_change_only_heard_of_is_read_from_the_database(app, watcher, changes, engine, reads) -> None:
    """Another process settled the order: its notification names the order, not its state."""
    order = place(app)
    call = Recorded()
    watcher.open(order.order_id, call)
    with engine.begin() as connection:
        connection.execute(
            update(orders)
            .where(orders.c.id == order.order_id)
            .values(status=OrderStatus.VALIDATED.value, version=orders.c.version + 1)
        )
    changes.publish([order.order_id])  # as db.notifications does for another process's commit

    assert call.ended.wait(10)
    assert states(call) == [(OrderStatus.PENDING, 1), (OrderStatus.VALIDATED, 2)]
    assert reads == [order.order_id]


def test_what_was_committed_longer_ago_than_the_window_is_read(app, watcher, clock, reads) -> None:
    order = place(app)
    clock.now += 2.5  # past recent_s
    call = Recorded()
    watcher.open(order.order_id, call)

    wait_until(lambda: call.sent, timeout=10, what="the first state")
    assert states(call) == [(OrderStatus.PENDING, 1)]
    assert reads == [order.order_id]


def test_the_later_of_two_crossing_announcements_stays(clock: Clock) -> None:
    changes = OrderChanges(recent_s=2.0, clock=clock)
    order = Order.place("alice", (OrderItem("SKU-1", 1),))[0]
    cancelled = order.cancel()[0]
    changes.publish_order(cancelled)
    changes.remember(order)  # announced late: older than what is kept
    assert changes.recent(order.order_id) == cancelled
    changes.publish([order.order_id])
    assert changes.recent(order.order_id) is None


def test_the_window_keeps_a_bounded_number_of_orders(clock: Clock) -> None:
    changes = OrderChanges(recent_s=2.0, recent_max=3, clock=clock)
    placed = [Order.place("alice", (OrderItem("SKU-1", 1),))[0] for _ in range(5)]
    for order in placed:
        changes.remember(order)
    assert [changes.recent(order.order_id) for order in placed] == [None, None, *placed[2:]]
