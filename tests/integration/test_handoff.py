"""Hand-off: an order placed while a saga worker is idle goes to the local dispatcher already
leased, with no claim; other dispatchers cannot take it until its lease runs out, and workers
promised to events that were never committed are given back."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

import grpc
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import update

import db.outbox
from db.outbox import ClaimedEvent, Lease, OutboxStore
from db.tables import outbox_events
from db.unit_of_work import OrdersUnitOfWork
from domain.model import Order, OrderItem, utcnow
from saga.dispatcher import DispatcherSettings, OutboxDispatcher
from saga.signals import WakeUp
from saga.verdicts import Completed, Done, Handler
from tests.integration.helpers import place_request, rows_of, rpc_error
from tests.integration.saga_support import wait_for_status
from tests.support import wait_until


def test_an_order_placed_while_a_worker_is_idle_runs_without_a_claim(server, monkeypatch):
    claimed_ids: list[int] = []
    real = OutboxStore.complete_and_claim

    def recording(self, finished, limit, lease, now):
        done, events = real(self, finished, limit, lease, now)
        claimed_ids.extend(event.id for event in events)
        return done, events

    monkeypatch.setattr(OutboxStore, "complete_and_claim", recording)  # the dispatcher's claim
    server.stubs.set_stock("SKU-1", 5)

    placed = server.stubs.place("ann", [("SKU-1", 2)])
    assert wait_for_status(server.stubs, placed.order_id).status == pb.ORDER_STATUS_VALIDATED

    (event,) = rows_of(server).events(placed.order_id)
    assert event.status == "DONE"
    assert event.id not in claimed_ids, "the event was handed over, not claimed"
    assert server.service.dispatcher is not None
    assert server.service.dispatcher.stats.claimed >= 1  # a hand-off counts as claimed


def _place_leased(engine, dispatcher: OutboxDispatcher) -> tuple[Lease, list[ClaimedEvent]]:
    lease = dispatcher.take_slots(1)
    assert lease is not None
    order, placed = Order.place("ann", (OrderItem("SKU-1", 1),), None, now=utcnow())
    with OrdersUnitOfWork(engine) as uow:
        events = uow.add_order(order, None, [placed], "corr-1", lease)
        uow.commit()
    return lease, events


def test_a_leased_event_is_not_claimable_until_its_lease_runs_out(engine):
    settings = DispatcherSettings(workers=1, poll_interval_s=60.0, lease_s=30.0)
    dispatcher = _started(engine, {}, settings)
    try:
        _lease, (event,) = _place_leased(engine, dispatcher)
        with OrdersUnitOfWork(engine) as uow:
            assert uow.outbox.claim(10, timedelta(seconds=30), utcnow()) == []
            # The lease runs out (its end moved into the past, as 31 s would move it).
            uow.connection.execute(
                update(outbox_events).values(locked_until=utcnow() - timedelta(seconds=1))
            )
            (taken_over,) = uow.outbox.claim(10, timedelta(seconds=30), utcnow())
            uow.commit()
        assert taken_over.id == event.id
        assert taken_over.lease_token != event.lease_token, "the late lease holder is fenced out"
    finally:
        dispatcher.stop(1.0)


def test_only_idle_workers_are_promised_and_returned_ones_can_be_promised_again(engine):
    settings = DispatcherSettings(workers=2, poll_interval_s=60.0)
    dispatcher = OutboxDispatcher(partial(OrdersUnitOfWork, engine), {}, settings, WakeUp())
    assert dispatcher.take_slots(1) is None, "not before the dispatcher runs"
    dispatcher.start()
    try:
        first, second = dispatcher.take_slots(1), dispatcher.take_slots(1)
        assert first is not None and second is not None
        assert dispatcher.take_slots(1) is None, "both workers are promised"
        dispatcher.return_slots(first)
        assert dispatcher.take_slots(1) is not None
    finally:
        dispatcher.stop(1.0)


def test_a_failed_place_gives_its_worker_back(server, monkeypatch):
    real = db.outbox.OutboxStore.new_rows

    def refused(events, correlation_id, now, lease=None):
        return [{**row, "status": None} for row in real(events, correlation_id, now, lease)]

    monkeypatch.setattr(db.outbox.OutboxStore, "new_rows", staticmethod(refused))
    dispatcher = server.service.dispatcher
    assert dispatcher is not None
    for _ in range(server.service.settings.saga_workers + 1):
        error = rpc_error(server.stubs.orders.PlaceOrder, place_request("bob"), timeout=10)
        assert error.code() == grpc.StatusCode.INTERNAL
    # Had each failure kept its promised worker, none would be left to promise now.
    leases = [dispatcher.take_slots(1) for _ in range(server.service.settings.saga_workers)]
    assert all(lease is not None for lease in leases)


def test_events_handed_to_a_stopping_dispatcher_go_back_to_the_queue(engine):
    ran: list[int] = []

    def record(event: ClaimedEvent) -> Done:
        ran.append(event.id)
        return Done()

    settings = DispatcherSettings(workers=1, poll_interval_s=60.0, lease_s=30.0)
    dispatcher = _started(engine, {"ORDER_CREATED": record}, settings)
    lease = dispatcher.take_slots(1)
    assert lease is not None
    order, placed = Order.place("ann", (OrderItem("SKU-1", 1),), None, now=utcnow())
    with OrdersUnitOfWork(engine) as uow:
        events = uow.add_order(order, None, [placed], "corr-1", lease)
        uow.commit()
    stopper = threading.Thread(target=dispatcher.stop, args=(5.0,))
    stopper.start()
    wait_until(lambda: dispatcher.stopping, what="the dispatcher to stop")
    dispatcher.hand(lease, events)
    stopper.join(10)

    assert ran == []
    with engine.connect() as connection:
        row = connection.execute(outbox_events.select().where(outbox_events.c.id == events[0].id)).one()
    assert (row.status, row.attempts, row.lease_token) == ("PENDING", 0, None)
    assert row.last_error == "dispatcher stopping"


def test_finished_events_do_not_wake_the_dispatcher_for_claims_that_find_nothing(engine, monkeypatch):
    claims: list[int] = []
    real = OutboxStore.complete_and_claim

    def counting(self, finished, limit, lease, now):
        claims.append(limit)
        return real(self, finished, limit, lease, now)

    monkeypatch.setattr(OutboxStore, "complete_and_claim", counting)  # the dispatcher's claim
    ran: list[int] = []

    def record(event: ClaimedEvent) -> Completed:
        ran.append(event.id)
        return Completed()

    settings = DispatcherSettings(workers=2, poll_interval_s=60.0)
    dispatcher = _started(engine, {"ORDER_CREATED": record}, settings)

    def handled(count: int) -> bool:
        return len(ran) == count and dispatcher.in_flight == 0

    try:
        wait_until(lambda: claims, what="the first claim at start")
        for n in range(1, 6):
            dispatcher.hand(*_place_leased(engine, dispatcher))
            wait_until(partial(handled, n), what="the handler")
        assert len(ran) == 5
        assert len(claims) == 1, "a handler that finished found nothing more to claim, so none ran"
    finally:
        dispatcher.stop(1.0)


def test_a_later_event_of_a_running_order_is_claimed_as_soon_as_the_first_finishes(engine):
    gate = threading.Event()
    ran: list[str] = []
    handler = _self_completing(engine, ran, gate, "FIRST", key=lambda event: event.event_type)

    settings = DispatcherSettings(workers=2, poll_interval_s=60.0)  # polling alone would take a minute
    wake = WakeUp()
    dispatcher = _started(engine, {"FIRST": handler, "SECOND": handler}, settings, wake)
    try:
        with OrdersUnitOfWork(engine) as uow:
            uow.outbox.add_raw("order-1", "FIRST", "{}", {}, utcnow())
            uow.commit()
        wake.set()
        wait_until(lambda: ran == ["FIRST"], what="the first event to run")
        with OrdersUnitOfWork(engine) as uow:
            uow.outbox.add_raw("order-1", "SECOND", "{}", {}, utcnow())
            uow.commit()
        dispatcher.note_committed("order-1")
        wake.set()  # its claim finds the second event blocked behind the running first one
        gate.set()
        wait_until(lambda: ran == ["FIRST", "SECOND"], timeout=10, what="the second event to run")
    finally:
        gate.set()
        dispatcher.stop(1.0)


def test_an_event_committed_while_every_worker_is_busy_runs_as_soon_as_one_is_free(engine):
    gate = threading.Event()
    ran: list[str] = []
    handler = _self_completing(engine, ran, gate, "busy", key=lambda event: event.aggregate_id)

    settings = DispatcherSettings(workers=1, poll_interval_s=60.0)  # polling alone would take a minute
    wake = WakeUp()
    dispatcher = _started(engine, {"TEST": handler}, settings, wake)
    try:
        _add_and_wake(engine, wake, "busy")
        wait_until(lambda: ran == ["busy"], what="the only worker to be busy")
        _add_and_wake(engine, wake, "waiting")  # no worker is free: the dispatcher cannot claim it now
        wait_until(lambda: dispatcher.owes_claim, what="the dispatcher to owe a claim")
        gate.set()
        wait_until(lambda: ran == ["busy", "waiting"], timeout=10, what="the waiting event to run")
    finally:
        gate.set()
        dispatcher.stop(1.0)


def test_a_handed_event_s_dispatch_lag_counts_from_its_commit(engine):
    lags: list[float] = []
    settings = DispatcherSettings(workers=1, poll_interval_s=60.0)
    dispatcher = _started(
        engine,
        {"ORDER_CREATED": lambda event: Completed()},
        settings,
        on_claimed=lambda _event, lag_s: lags.append(lag_s),
    )
    try:
        lease, events = _place_leased(engine, dispatcher)
        committed_at = events[0].created_at + timedelta(hours=1)  # a commit an hour after creation
        dispatcher.hand(lease, events, committed_at)
        wait_until(lambda: lags, what="the hand-off")
        # Counted from the creation, the lag would be positive; from that commit, nothing is left.
        assert lags == [0.0]
    finally:
        dispatcher.stop(1.0)


def test_the_dispatcher_says_at_stop_how_many_events_it_took_and_how(engine, caplog):
    settings = DispatcherSettings(workers=2, poll_interval_s=60.0)
    dispatcher = _started(engine, {"ORDER_CREATED": lambda event: Completed()}, settings)
    try:
        dispatcher.hand(*_place_leased(engine, dispatcher))
        wait_until(lambda: dispatcher.stats.done == 1, what="the hand-off to run")
    finally:
        with caplog.at_level("INFO", logger="orders.dispatcher"):
            dispatcher.stop(1.0)
    assert dispatcher.stats.handed == 1
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dispatcher stopped")]
    assert stopped == ["dispatcher stopped: 1 events taken (1 handed over at commit, 0 in batches), 1 done"]


def test_events_kept_waiting_for_a_claim_get_the_next_free_worker_before_new_hand_offs(engine):
    gate = threading.Event()
    ran: list[str] = []
    handler = _self_completing(engine, ran, gate, "busy", key=lambda event: event.aggregate_id)

    # Polling alone would take a minute; waiting events go first at once.
    settings = DispatcherSettings(workers=2, poll_interval_s=60.0, handoff_yield_after_s=0.0)
    wake = WakeUp()
    dispatcher = _started(engine, {"TEST": handler}, settings, wake)
    try:
        _add_and_wake(engine, wake, "busy")
        wait_until(lambda: ran == ["busy"], what="one worker to be busy")
        promised = dispatcher.take_slots(1)  # the other worker, for an order being placed
        assert promised is not None
        _add_and_wake(engine, wake, "waiting")  # committed unleased: no worker free to claim it
        wait_until(lambda: dispatcher.owes_claim, what="the dispatcher to owe a claim")
        dispatcher.return_slots(promised)  # that order failed: its worker is free again

        assert dispatcher.take_slots(1) is None, "the free worker belongs to the waiting event"
        wait_until(lambda: ran == ["busy", "waiting"], timeout=10, what="the waiting event to run")
    finally:
        gate.set()
        dispatcher.stop(1.0)


def _started(
    engine,
    handlers: dict[str, Handler],
    settings: DispatcherSettings,
    wake: WakeUp | None = None,
    **options: Any,
) -> OutboxDispatcher:
    """A dispatcher on `engine`, running."""
    dispatcher = OutboxDispatcher(
        partial(OrdersUnitOfWork, engine), handlers, settings, wake or WakeUp(), **options
    )
    dispatcher.start()
    return dispatcher


def _add_and_wake(engine, wake: WakeUp, aggregate_id: str) -> None:
    with OrdersUnitOfWork(engine) as uow:
        uow.outbox.add_raw(aggregate_id, "TEST", "{}", {}, utcnow())
        uow.commit()
    wake.set()


def _self_completing(
    engine, ran: list[str], gate: threading.Event, blocked: str, key: Callable[[ClaimedEvent], str]
) -> Handler:
    """A handler that records `key(event)`, waits for `gate` on the event keyed `blocked`, and marks
    its event DONE itself, as the saga does: nothing is left for the dispatcher to write, so only
    what the test is about can bring the dispatcher back before its (long) poll."""

    def handler(event: ClaimedEvent) -> Completed:
        ran.append(key(event))
        if key(event) == blocked:
            gate.wait(30)  # longer than the tests' waits: only what they test can run the rest
        with OrdersUnitOfWork(engine) as uow:
            assert uow.outbox.complete(event, utcnow())
            uow.commit()
        return Completed()

    return handler
