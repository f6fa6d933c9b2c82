"""The event relay's queue (db.relay) and its recording (db.recording), on both backends: every
change of an order is recorded in the transaction of the change, with the order as the change left
it; nothing is recorded by the plain unit of work; one order's events are claimed one at a time,
in version order, the next only once the one before is DONE."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

from sqlalchemy import func, select

from application.orders import OrderApplication
from application.paging import PageTokenCodec
from db.inventory import InventoryUnitOfWork
from db.recording import RecordingOrdersUnitOfWork
from db.relay import RelayUnitOfWork
from db.tables import relay_events
from db.unit_of_work import OrdersUnitOfWork
from domain import correlation
from domain.model import OrderItem, Settlement, utcnow
from domain.validation import PlaceOrderCommand
from relay.service import RelayHousekeeper
from saga.housekeeping import Housekeeper

LEASE = timedelta(seconds=30)


def app_on(engine, recording: bool, woken: list[int] | None = None) -> OrderApplication:
    uow: Callable[..., OrdersUnitOfWork]
    if recording:
        wakes = woken if woken is not None else []
        uow = partial(RecordingOrdersUnitOfWork, engine, on_recorded=lambda: wakes.append(1))
    else:
        uow = partial(OrdersUnitOfWork, engine)
    return OrderApplication(uow, partial(InventoryUnitOfWork, engine), PageTokenCodec(b"k"))


def place(app: OrderApplication, customer: str = "alice", request_id: str | None = None) -> str:
    command = PlaceOrderCommand(customer, (OrderItem("SKU-1", 2), OrderItem("SKU-2", 1)), request_id)
    with correlation.bound("corr-1", None):
        return app.place_order(command).order_id


def rows(engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(relay_events).order_by(relay_events.c.id)).all())


def claim(engine, limit: int = 10, finished=()):
    with RelayUnitOfWork(engine) as uow:
        done, claimed = uow.outbox.complete_and_claim(list(finished), limit, LEASE, utcnow())
        uow.commit()
    return done, claimed


def test_the_plain_unit_of_work_records_nothing(engine):
    app = app_on(engine, recording=False)
    order_id = place(app)
    app.cancel_order(order_id, None)

    assert rows(engine) == []


def test_placing_and_cancelling_record_each_change_with_the_order_as_it_left_it(engine):
    woken: list[int] = []
    app = app_on(engine, recording=True, woken=woken)
    order_id = place(app)
    with correlation.bound("corr-2", None):
        app.cancel_order(order_id, None)

    placed, cancelled = rows(engine)
    assert (placed.order_id, placed.kind, placed.version, placed.order_status) == (
        order_id,
        "placed",
        1,
        "PENDING",
    )
    assert placed.customer_id == "alice"
    assert json.loads(placed.placed_items) == [
        {"sku": "SKU-1", "quantity": 2},
        {"sku": "SKU-2", "quantity": 1},
    ]
    assert json.loads(placed.headers)["correlation_id"] == "corr-1"
    assert (cancelled.kind, cancelled.version, cancelled.order_status) == ("cancelled", 2, "CANCELLED")
    assert json.loads(cancelled.headers)["correlation_id"] == "corr-2"
    assert cancelled.placed_items == ""
    assert placed.status == cancelled.status == "PENDING"
    assert len(woken) == 2  # once per committed transaction


def test_a_placement_that_rolls_back_records_nothing(engine):
    app = app_on(engine, recording=True)
    place(app, request_id="same")
    place(app, request_id="same")  # the idempotent replay: its transaction rolled back

    assert [row.kind for row in rows(engine)] == ["placed"]


def test_a_settlement_records_validated_or_failed_with_the_creating_events_headers(engine):
    app = app_on(engine, recording=True)
    first, second = place(app), place(app)
    with OrdersUnitOfWork(engine) as uow:  # the saga's claim of the two ORDER_CREATED events
        events = uow.outbox.claim(10, LEASE, utcnow())
        uow.commit()
    by_order = {event.aggregate_id: event for event in events}
    with RecordingOrdersUnitOfWork(engine) as uow:
        assert uow.settle_and_complete(first, Settlement.validated(), by_order[first], utcnow()) == (
            True,
            True,
        )
        uow.commit()
    with RecordingOrdersUnitOfWork(engine) as uow:
        failed = Settlement.failed("insufficient stock")
        assert uow.settle_and_complete(second, failed, by_order[second], utcnow()) == (True, True)
        uow.commit()

    settled = {(row.order_id, row.kind): row for row in rows(engine) if row.version == 2}
    validated, failed_row = settled[(first, "validated")], settled[(second, "failed")]
    assert validated.order_status == "VALIDATED"
    assert (failed_row.order_status, failed_row.failure_reason) == ("FAILED", "insufficient stock")
    assert json.loads(validated.headers) == dict(by_order[first].headers)


def test_a_settlement_that_lost_its_lease_records_nothing(engine):
    app = app_on(engine, recording=True)
    order_id = place(app)
    with OrdersUnitOfWork(engine) as uow:
        (event,) = uow.outbox.claim(10, LEASE, utcnow())
        uow.commit()
    stale = type(event)(**{**event.__dict__, "lease_token": "someone-else"})
    with RecordingOrdersUnitOfWork(engine) as uow:
        _settled, completed = uow.settle_and_complete(order_id, Settlement.validated(), stale, utcnow())
        assert not completed
        # the saga leaves without committing (see saga.inventory._settle)

    assert [row.kind for row in rows(engine)] == ["placed"]


def test_the_expiry_sweep_records_expired(engine):
    app = app_on(engine, recording=True)
    order_id = place(app)
    sweeper = Housekeeper(partial(RecordingOrdersUnitOfWork, engine), 3600, saga_timeout_s=0.001)
    later = utcnow() + timedelta(seconds=5)
    sweeper._clock = lambda: later  # the order is older than the timeout by then

    assert sweeper.sweep_expired_sagas() == 1
    expired = rows(engine)[-1]
    assert (expired.order_id, expired.kind, expired.version) == (order_id, "expired", 2)
    assert (expired.order_status, expired.failure_reason) == ("FAILED", "saga timed out")


def test_an_orders_events_are_claimed_one_at_a_time_in_version_order(engine):
    app = app_on(engine, recording=True)
    first, second = place(app), place(app)
    app.cancel_order(first, None)  # first: placed (v1), cancelled (v2); second: placed (v1)

    _done, claimed = claim(engine)
    assert sorted((e.aggregate_id, e.event_type) for e in claimed) == sorted(
        [(first, "placed"), (second, "placed")]
    )
    assert claim(engine)[1] == []  # v2 of `first` waits for its v1, which is leased

    done, claimed = claim(engine, finished=claimed)
    assert len(done) == 2
    # On PostgreSQL the round is one statement, whose snapshot still sees v1 PENDING: the next
    # round claims v2. On SQLite the round is two statements.
    if not claimed:
        _done, claimed = claim(engine)
    assert [(e.aggregate_id, e.event_type) for e in claimed] == [(first, "cancelled")]
    payload = json.loads(claimed[0].payload)
    assert (payload["version"], payload["status"], payload["customer_id"]) == (2, "CANCELLED", "alice")


def test_a_dead_event_holds_back_its_orders_later_events(engine):
    app = app_on(engine, recording=True)
    order_id = place(app)
    app.cancel_order(order_id, None)
    (placed,) = claim(engine)[1]
    with RelayUnitOfWork(engine) as uow:
        assert uow.outbox.bury(placed, "rejected", utcnow())
        uow.commit()

    assert claim(engine)[1] == []
    with RelayUnitOfWork(engine) as uow:
        assert uow.outbox.replay(placed.id, utcnow())
        uow.commit()
    assert [e.event_type for e in claim(engine)[1]] == ["placed"]


def test_a_deferral_gives_back_its_attempt_and_a_stale_lease_writes_nothing(engine):
    app = app_on(engine, recording=True)
    place(app)
    (event,) = claim(engine)[1]
    stale = type(event)(**{**event.__dict__, "lease_token": "someone-else"})
    with RelayUnitOfWork(engine) as uow:
        assert not uow.outbox.reschedule(stale, 0.0, utcnow(), "late", count_attempt=False)
        assert uow.outbox.reschedule(event, 0.0, utcnow(), "broker down", count_attempt=False)
        uow.commit()

    (again,) = claim(engine)[1]
    assert again.attempts == 1  # the deferral gave its attempt back; this claim counted one
    assert again.claims == 2
    with RelayUnitOfWork(engine) as uow:
        assert uow.outbox.renew([again], LEASE, utcnow()) == {again.id}
        assert uow.outbox.backlog(utcnow())[0] == 1
        uow.commit()
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(relay_events)).scalar_one() == 1


def test_the_relays_housekeeping_deletes_done_rows_a_batch_at_a_time_and_reports_the_backlog(engine):
    app = app_on(engine, recording=True)
    for _ in range(3):
        place(app)
    _done, claimed = claim(engine)
    with RelayUnitOfWork(engine) as uow:
        assert len(uow.outbox.complete_many(claimed[:2], utcnow())) == 2
        uow.commit()
    seen: list[tuple[int, float]] = []
    keeper = RelayHousekeeper(
        partial(RelayUnitOfWork, engine),
        retention_s=0,
        interval_s=3600,
        on_backlog=lambda pending, oldest_s: seen.append((pending, oldest_s)),
        batch=1,
        clock=lambda: utcnow() + timedelta(seconds=1),
    )

    deleted, pending, _oldest_s = keeper.once()

    assert (deleted, pending) == (2, 1)
    assert [count for count, _ in seen] == [1]
    assert [row.id for row in rows(engine)] == [claimed[2].id]
