"""What a stopping dispatcher leaves behind: finished events DONE, and events it claimed ahead of
its workers handed back at once instead of held until their leases run out."""

from __future__ import annotations

import threading
from functools import partial

from db.outbox import OutboxRow
from db.tables import outbox_events
from db.unit_of_work import OrdersUnitOfWork
from domain.model import utcnow
from saga.dispatcher import DispatcherSettings, OutboxDispatcher
from saga.signals import WakeUp
from saga.verdicts import Done
from tests.support import wait_until


def add_events(engine, count: int) -> list[int]:
    with OrdersUnitOfWork(engine) as uow:
        ids = [uow.outbox.add_raw(f"aggregate-{i}", "TEST", "{}", {}, utcnow()) for i in range(count)]
        uow.commit()
    return ids


def rows(engine) -> dict[int, OutboxRow]:
    with OrdersUnitOfWork(engine, write=False) as uow:
        return {row.id: row for row in uow.outbox.rows(limit=1000)}


def lease_of(engine, event_id: int) -> str | None:
    with engine.connect() as connection:
        return (
            connection.execute(outbox_events.select().where(outbox_events.c.id == event_id)).one().lease_token
        )


def test_an_event_claimed_ahead_is_handed_back_when_the_dispatcher_stops(engine):
    ids = add_events(engine, 6)
    gate, started = threading.Event(), []

    def handler(event):
        started.append(event.id)
        gate.wait(10)  # the only worker is busy until the test lets it go
        return Done()

    settings = DispatcherSettings(workers=1, poll_interval_s=0.05, lease_s=30.0)
    dispatcher = OutboxDispatcher(partial(OrdersUnitOfWork, engine), {"TEST": handler}, settings, WakeUp())
    dispatcher.start()
    # One worker: the first round claims two events, one to run and one queued behind it. It came
    # back full (a backlog), but with no worker idle nothing more is claimed.
    wait_until(lambda: started == ids[:1] and dispatcher.stats.claimed == 2, what="a claim one ahead")
    assert all(lease_of(engine, event_id) is not None for event_id in ids[:2])

    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(dispatcher.stop(5.0)))
    stopper.start()
    # The busy worker finishes only once the dispatcher is stopping, so the queued event meets a
    # stopping dispatcher whatever the machine's speed.
    wait_until(lambda: dispatcher.stopping, what="the dispatcher to stop claiming")
    gate.set()
    stopper.join(10)
    assert stopped == [True]

    after = rows(engine)
    assert after[ids[0]].status == "DONE"
    assert started == ids[:1], "a queued event must not run once the dispatcher is stopping"
    queued = ids[1]
    assert (after[queued].status, after[queued].attempts) == ("PENDING", 0)
    assert after[queued].last_error == "dispatcher stopping"
    assert lease_of(engine, queued) is None, "handed back, not held for its 30 s lease"
    for beyond in ids[2:]:
        assert (after[beyond].status, lease_of(engine, beyond)) == ("PENDING", None), "never claimed"


def test_every_finished_event_is_done_when_stop_returns(engine):
    ids = add_events(engine, 40)
    handled: list[int] = []

    def handler(event):
        handled.append(event.id)
        return Done()

    settings = DispatcherSettings(workers=4, poll_interval_s=0.05, lease_s=30.0)
    dispatcher = OutboxDispatcher(partial(OrdersUnitOfWork, engine), {"TEST": handler}, settings, WakeUp())
    dispatcher.start()
    # Every handler ran (not merely claimed: a claimed event still queued when stop() comes is
    # handed back, see the test above); some of them are not yet marked DONE.
    wait_until(lambda: len(handled) == len(ids), what="every event handled")

    assert dispatcher.stop(5.0)

    assert {row.status for row in rows(engine).values()} == {"DONE"}
    assert dispatcher.stats.done == len(ids)
