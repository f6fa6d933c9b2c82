"""The dispatcher's round: finished events marked DONE and due ones claimed, in one statement on
PostgreSQL (OutboxStore.complete_and_claim), with the same outcome as the two on SQLite."""

from __future__ import annotations

import time
from datetime import timedelta
from functools import partial

from db.outbox import ClaimedEvent, OutboxStore
from db.unit_of_work import OrdersUnitOfWork
from domain.model import utcnow
from saga.dispatcher import DispatcherSettings, OutboxDispatcher
from saga.signals import WakeUp
from saga.verdicts import Done
from tests.support import wait_until

LEASE = timedelta(seconds=30)


def _add(engine, *aggregates: str) -> list[int]:
    with OrdersUnitOfWork(engine) as uow:
        ids = [uow.outbox.add_raw(a, "TEST", "{}", {}, utcnow()) for a in aggregates]
        uow.commit()
    return ids


def _round(engine, finished, limit, now):
    with OrdersUnitOfWork(engine) as uow:
        done, claimed = uow.outbox.complete_and_claim(finished, limit, LEASE, now)
        uow.commit()
    return done, claimed


def _status(engine, event_id: int) -> str:
    with OrdersUnitOfWork(engine, write=False) as uow:
        return {row.id: row.status for row in uow.outbox.rows(limit=100)}[event_id]


def test_a_round_marks_the_finished_done_and_claims_the_next(engine):
    first, second, third = _add(engine, "a", "b", "c")
    _none, held = _round(engine, [], 2, utcnow())
    assert [event.id for event in held] == [first, second]

    done, claimed = _round(engine, held, 10, utcnow())
    assert done == {first, second}
    assert [event.id for event in claimed] == [third]
    assert _status(engine, first) == _status(engine, second) == "DONE"


def test_a_finished_event_whose_lease_ran_out_is_marked_done_not_claimed_again(engine):
    (only,) = _add(engine, "a")
    start = utcnow()
    _none, held = _round(engine, [], 1, start)
    done, claimed = _round(engine, held, 10, start + LEASE + timedelta(seconds=5))
    assert done == {only}
    assert claimed == []
    assert _status(engine, only) == "DONE"


def test_a_later_event_of_a_finished_order_is_claimed_within_the_next_round(engine):
    first, later = _add(engine, "a", "a")
    _none, held = _round(engine, [], 10, utcnow())
    assert [event.id for event in held] == [first]  # one event per order at a time
    done, claimed = _round(engine, held, 10, utcnow())
    assert done == {first}
    if not claimed:  # PostgreSQL: both parts of the statement saw `first` still PENDING
        _none, claimed = _round(engine, [], 10, utcnow())
    assert [event.id for event in claimed] == [later]


def test_the_dispatcher_runs_the_later_event_of_a_finished_order_without_waiting_for_its_poll(engine):
    ran: list[int] = []

    def record(event: ClaimedEvent) -> Done:
        ran.append(event.id)
        return Done()

    first, later = _add(engine, "a", "a")
    settings = DispatcherSettings(workers=2, poll_interval_s=60.0)  # the poll alone would take a minute
    dispatcher = OutboxDispatcher(partial(OrdersUnitOfWork, engine), {"TEST": record}, settings, WakeUp())
    dispatcher.start()
    try:
        wait_until(lambda: ran == [first, later], timeout=10, what="both events to run")
    finally:
        dispatcher.stop(1.0)


def test_a_backlog_is_claimed_in_batches_of_at_least_the_worker_count(engine, monkeypatch):
    """In a backlog the dispatcher keeps more events claimed ahead, but does not top its queue up
    as each handler finishes: that made a claim statement for every event or two under load."""
    ids = _add(engine, *(f"order-{n}" for n in range(40)))
    limits: list[int] = []
    original = OutboxStore.complete_and_claim

    def recording(self, finished, limit, lease, now):
        if limit > 0:
            limits.append(limit)
        return original(self, finished, limit, lease, now)

    monkeypatch.setattr(OutboxStore, "complete_and_claim", recording)

    def handler(_event):
        time.sleep(0.005)  # a handler that takes a moment, so the backlog outlasts a round
        return Done()

    settings = DispatcherSettings(workers=2, poll_interval_s=0.05)
    dispatcher = OutboxDispatcher(partial(OrdersUnitOfWork, engine), {"TEST": handler}, settings, WakeUp())
    dispatcher.start()
    try:
        wait_until(lambda: dispatcher.stats.done == len(ids), timeout=20, what="every event DONE")
    finally:
        dispatcher.stop(5.0)
    assert limits and min(limits) >= settings.workers, limits
