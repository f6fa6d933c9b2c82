"""How much the dispatcher claims in a backlog (saga.rounds): larger rounds once its handlers get
through what it claims, the usual size while they defer (each instance with a rate limiter of its
own would otherwise claim most of a backlog it can only defer and leave the others idle)."""

from __future__ import annotations

import itertools
import threading
from functools import partial

import pytest

from db.outbox import ClaimedEvent, OutboxStore
from db.unit_of_work import OrdersUnitOfWork
from domain.model import utcnow
from saga.dispatcher import DispatcherSettings, OutboxDispatcher
from saga.rounds import BACKLOG_CLAIM, SETTLED
from saga.signals import WakeUp
from saga.verdicts import Defer, Done, Verdict
from tests.support import wait_until

W = 4  # workers
EVENTS = 40 * W
LET_THROUGH_EVERY = 2 * W  # the limited handler's: one event done, the next ones deferred


@pytest.fixture
def claim_limits(monkeypatch) -> list[int]:
    """The number of events each of the dispatcher's claims asked for (0: DONE marks only)."""
    limits: list[int] = []
    real = OutboxStore.complete_and_claim

    def recording(self, finished, limit, lease, now):
        limits.append(limit)
        return real(self, finished, limit, lease, now)

    monkeypatch.setattr(OutboxStore, "complete_and_claim", recording)
    return limits


def backlog(engine, events: int) -> None:
    """`events` due events of as many orders, committed before any dispatcher starts."""
    with OrdersUnitOfWork(engine) as uow:
        for n in range(events):
            uow.outbox.add_raw(f"order-{n}", "TEST", "{}", {}, utcnow())
        uow.commit()


def drained(engine, handler, done: int, deferred: int) -> None:
    """A dispatcher of W workers run on the backlog until its handlers answered every event."""
    settings = DispatcherSettings(workers=W, poll_interval_s=60.0)  # the backlog alone drives it
    dispatcher = OutboxDispatcher(partial(OrdersUnitOfWork, engine), {"TEST": handler}, settings, WakeUp())
    dispatcher.start()
    try:
        stats = dispatcher.stats
        wait_until(
            lambda: (stats.done, stats.deferred) == (done, deferred) and dispatcher.in_flight == 0,
            timeout=30,
            what=f"{done} events done and {deferred} deferred",
        )
    finally:
        dispatcher.stop(5.0)


def test_a_backlog_its_handlers_get_through_is_claimed_in_larger_rounds(engine, claim_limits):
    backlog(engine, EVENTS)

    drained(engine, lambda _event: Done(), done=EVENTS, deferred=0)

    claims = [limit for limit in claim_limits if limit > 0]
    assert claims[0] == 2 * W, "the first round claims two batches' worth"
    assert max(claims) == BACKLOG_CLAIM * W, claims
    # Larger only once SETTLED batches' worth were done in a row.
    first_large = claims.index(BACKLOG_CLAIM * W)
    assert sum(claims[:first_large]) >= SETTLED * W, claims


def test_a_backlog_its_handlers_defer_is_claimed_two_batches_at_a_time(engine, claim_limits):
    backlog(engine, EVENTS)
    calls = itertools.count()
    lock = threading.Lock()

    def limited(_event: ClaimedEvent) -> Verdict:
        """Like a rate limiter of a few calls a second: one let through, the next few deferred."""
        with lock:
            call = next(calls)
        return Done() if call % LET_THROUGH_EVERY == 0 else Defer(60.0, "rate limited")

    answered = EVENTS // LET_THROUGH_EVERY
    drained(engine, limited, done=answered, deferred=EVENTS - answered)

    claims = [limit for limit in claim_limits if limit > 0]
    assert max(claims) == 2 * W, claims
