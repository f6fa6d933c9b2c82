"""A saga step that outlived its lease changes nothing (issue 15, items 1 to 3), on both databases.

Two dispatchers, each with its own engine, saga and fault switches (as two processes would have),
share one database. A hook pauses a step of the first at a chosen boundary, as a whole process
stalls (its leases are not renewed meanwhile); once the database says its lease has run out, the
second takes the event over and settles the order. Then the first resumes, stale:

- it gives up on the order (its last attempt failed) and, before the fix, released the stock of
  the order the second had just VALIDATED;
- it was refused the stock and, "closing the order before failing it", released before the fix
  every reservation of the order, the second's included.

Both ended with a VALIDATED order holding nothing. Now every inventory write is fenced on the
step's (event, claim) and every order write on its lease token: the stale step writes nothing.
A refusal now closes the order in its own transaction (`StockRepository.reserve`), so the second
finds the order closed and fails it for the first's reason, with nothing held.

Also here: a dispatcher whose clock runs a minute ahead steals no lease (PostgreSQL decides expiry
with its own clock), a slow step that is alive keeps its lease (renewed), an event whose lease ran
out in the worker queue is handed back unstarted, and the attempt is counted at the claim.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from sqlalchemy import func, select, update

from db.engine import EngineSettings, make_engine
from db.inventory import InventoryUnitOfWork
from db.outbox import ClaimedEvent
from db.tables import orders as orders_table
from db.tables import outbox_events, stock, stock_reservations
from db.unit_of_work import OrdersUnitOfWork
from domain.model import Order, OrderItem, utcnow
from saga.dispatcher import DispatcherSettings, OutboxDispatcher
from saga.inventory import InventoryParticipant, InventorySaga, SagaSettings
from saga.resilience import ConcurrentCircuitBreaker, Guard, RateLimiter
from saga.verdicts import BatchHandler, Verdict
from server.faults import FaultSwitches, FaultyParticipant
from tests.invariants import check_invariants
from tests.support import apply_schema, wait_until

SKU = "STALE-1"


class Hooks(FaultSwitches):
    """Fault switches set by the test: `values` as if read from a fault file, and a pause at one
    saga boundary (`pause_at`) that holds the step until `resume()`, renewing no lease meanwhile."""

    def __init__(self, pause_at: str = "", **values: Any) -> None:
        super().__init__("")
        self.values = dict(values)
        self.pause_at = pause_at
        self.paused = threading.Event()
        self._resumed = threading.Event()

    def get(self, name: str, default: Any = None) -> Any:
        if name == "lease_renewal_off" and self.paused.is_set() and not self._resumed.is_set():
            return True
        return self.values.get(name, default)

    def maybe_stall(self, boundary: str) -> None:
        if boundary == self.pause_at and not self.paused.is_set():
            self.paused.set()
            assert self._resumed.wait(30), "the test never resumed the paused step"

    def resume(self) -> None:
        self._resumed.set()


class Instance:
    """What one server process has for the saga: engine, participant, saga, dispatcher."""

    def __init__(
        self,
        url: str,
        settings: DispatcherSettings,
        hooks: Hooks,
        clock: Callable[[], Any] = utcnow,
        batching: bool = False,
        on_claimed: Callable[[ClaimedEvent, float], None] | None = None,
    ) -> None:
        """`batching`: the set-based ORDER_CREATED (PostgreSQL); `batches` records the event ids of
        each call of the batch handler. `on_claimed`: the dispatcher's, before a task is queued."""
        self.engine = make_engine(url, EngineSettings(pool_size=settings.workers + 4))
        self.outcomes: list[tuple[str, int]] = []
        self.runs: list[int] = []
        self.batches: list[list[int]] = []
        orders_uow = partial(OrdersUnitOfWork, self.engine)
        breaker = ConcurrentCircuitBreaker(slow_call_s=60.0, fail_max=100, reset_timeout=1.0, name="stale")
        saga = InventorySaga(
            orders_uow,
            FaultyParticipant(InventoryParticipant(partial(InventoryUnitOfWork, self.engine)), hooks),
            Guard(breaker, RateLimiter("100000/second")),
            SagaSettings(max_attempts=settings.max_attempts),
            batching=batching,
        )
        handlers = {kind: self._recorded(handler) for kind, handler in saga.handlers().items()}
        self.dispatcher = OutboxDispatcher(
            orders_uow,
            handlers,
            settings,
            clock=clock,
            listener=lambda outcome, event, _s: self.outcomes.append((outcome, event.id)),
            renewal_paused=hooks.renewal_paused,
            on_claimed=on_claimed,
            batch_handlers={kind: self._batched(h) for kind, h in saga.batch_handlers().items()},
        )

    def _recorded(self, handler: Callable[[ClaimedEvent], Verdict]) -> Callable[[ClaimedEvent], Verdict]:
        def run(event: ClaimedEvent) -> Verdict:
            self.runs.append(event.id)
            return handler(event)

        return run

    def _batched(self, handler: BatchHandler) -> BatchHandler:
        def run(events: Sequence[ClaimedEvent]) -> Mapping[int, Verdict]:
            self.batches.append([event.id for event in events])
            self.runs.extend(event.id for event in events)
            return handler(events)

        return run

    @property
    def stats(self) -> Any:
        return self.dispatcher.stats


@pytest.fixture
def instances(request: pytest.FixtureRequest) -> Iterator[Callable[..., Instance]]:
    """Factory of instances on `url` (by default the test's `migrated_url`), all stopped at the end."""
    made: list[Instance] = []

    def make(settings: DispatcherSettings, hooks: Hooks, url: str = "", **kwargs: Any) -> Instance:
        instance = Instance(url or request.getfixturevalue("migrated_url"), settings, hooks, **kwargs)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.dispatcher.stop(5.0)
        instance.engine.dispose()


def set_stock(url: str, available: int) -> None:
    engine = make_engine(url)
    try:
        with InventoryUnitOfWork(engine) as uow:
            uow.stock.set_available(SKU, available, utcnow())
            uow.commit()
    finally:
        engine.dispose()


def place(url: str, quantity: int) -> str:
    engine = make_engine(url)
    try:
        order, placed = Order.place("ann", (OrderItem(SKU, quantity),), None, now=utcnow())
        with OrdersUnitOfWork(engine) as uow:
            uow.add_order(order, None, [placed], "corr-stale")
            uow.commit()
        return order.order_id
    finally:
        engine.dispose()


def rows(url: str, order_id: str) -> tuple[Any, Any, list[tuple[str, int, str]], tuple[int, int]]:
    """The order, its event, its reservations and the SKU's (available, reserved)."""
    engine = make_engine(url)
    try:
        with engine.connect() as c:
            order = c.execute(select(orders_table).where(orders_table.c.id == order_id)).one()
            event = c.execute(select(outbox_events).where(outbox_events.c.aggregate_id == order_id)).one()
            mine = select(stock_reservations).where(stock_reservations.c.order_id == order_id)
            held = [(r.sku, r.quantity, r.status) for r in c.execute(mine)]
            level = c.execute(select(stock.c.available, stock.c.reserved).where(stock.c.sku == SKU)).first()
        return order, event, held, (level.available, level.reserved) if level else (0, 0)
    finally:
        engine.dispose()


def lease_ran_out(url: str, order_id: str) -> bool:
    """By the database's clock (the one claims go by), the event's lease has run out."""
    engine = make_engine(url)
    try:
        with engine.connect() as c:
            if engine.dialect.name == "postgresql":
                now: Any = c.execute(select(func.now())).scalar_one()
            else:
                now = utcnow()
            until = c.execute(
                select(outbox_events.c.locked_until).where(outbox_events.c.aggregate_id == order_id)
            ).scalar_one()
        return until is not None and until < now
    finally:
        engine.dispose()


def run_stale_step_against_a_live_one(
    url: str, instances: Callable[..., Instance], stale: Hooks, stock_before_takeover: int | None
) -> tuple[str, Instance, Instance]:
    """Start A with `stale` hooks; once its step pauses and its lease ran out, (set the stock and)
    start B, which settles the order; then resume A and wait for its outcome."""
    order_id = place(url, 3)
    a = instances(DispatcherSettings(workers=1, poll_interval_s=0.05, lease_s=0.5, max_attempts=1), stale)
    b = instances(DispatcherSettings(workers=1, poll_interval_s=0.05, lease_s=30.0, max_attempts=5), Hooks())
    a.dispatcher.start()
    wait_until(stale.paused.is_set, timeout=10, what="A's step to pause")
    stale.values.pop("inventory_error", None)  # the inventory answers again
    if stock_before_takeover is not None:
        set_stock(url, stock_before_takeover)
    wait_until(lambda: lease_ran_out(url, order_id), timeout=10, interval=0.05, what="A's lease to run out")
    b.dispatcher.start()
    wait_until(lambda: b.stats.done == 1, timeout=10, what="B to settle the order")
    stale.resume()
    wait_until(lambda: len(a.outcomes) == 1, timeout=10, what="A's stale step to end")
    return order_id, a, b


def assert_validated_with_its_reservation(url: str, order_id: str, initial: int) -> None:
    order, event, held, level = rows(url, order_id)
    assert (order.status, order.version) == ("VALIDATED", 2)
    assert event.status == "DONE"
    assert held == [(SKU, 3, "ACTIVE")], "the VALIDATED order lost its reservation"
    assert level == (initial - 3, 3)
    check_invariants(url, url, {SKU: initial})


def test_a_stale_step_that_gives_up_releases_nothing_of_the_order_another_step_validated(
    migrated_url: str, instances: Callable[..., Instance]
) -> None:
    set_stock(migrated_url, 10)
    # A's only attempt fails at the inventory, so it gives up; it pauses just before doing so.
    stale = Hooks(pause_at="before_release", inventory_error=True)

    order_id, a, b = run_stale_step_against_a_live_one(migrated_url, instances, stale, None)

    assert a.outcomes[0][0] == "fenced" and b.outcomes[0][0] == "done"
    assert_validated_with_its_reservation(migrated_url, order_id, 10)


def test_a_stale_step_refused_stock_closed_the_order_with_its_refusal_and_writes_nothing_more(
    migrated_url: str, instances: Callable[..., Instance]
) -> None:
    set_stock(migrated_url, 0)
    # A is refused the stock, which closes the order in the same transaction, and pauses before
    # failing it; meanwhile the stock is refilled and B takes the event over.
    stale = Hooks(pause_at="after_reserve")

    order_id, a, b = run_stale_step_against_a_live_one(migrated_url, instances, stale, 10)

    assert a.outcomes[0][0] == "fenced" and b.outcomes[0][0] == "done"
    order, event, held, level = rows(migrated_url, order_id)
    # B found the order closed by A's refusal and failed it for A's reason (not "already
    # released"), though the stock was back: it took none.
    assert (order.status, order.version) == ("FAILED", 2)
    assert order.failure_reason == f"insufficient stock for SKU {SKU!r}: requested 3, available 0"
    assert event.status == "DONE"
    assert held == [(SKU, 3, "RELEASED")]
    assert level == (10, 0)
    check_invariants(migrated_url, migrated_url, {SKU: 10})


def test_a_live_slow_step_keeps_its_lease_by_renewing_it(
    migrated_url: str, instances: Callable[..., Instance]
) -> None:
    set_stock(migrated_url, 10)
    order_id = place(migrated_url, 3)
    slow = Hooks(settle_delay_s=3.0)  # three leases long; slow, not stalled: leases are renewed
    a = instances(DispatcherSettings(workers=1, poll_interval_s=0.05, lease_s=1.0), slow)
    b = instances(DispatcherSettings(workers=1, poll_interval_s=0.05, lease_s=1.0), Hooks())
    a.dispatcher.start()
    wait_until(lambda: a.runs, timeout=10, what="A to start the step")
    b.dispatcher.start()

    wait_until(lambda: a.outcomes, timeout=10, what="A's step to end")

    assert a.outcomes == [("done", a.runs[0])], "the slow step kept its lease and recorded its outcome"
    assert a.dispatcher.renewed_leases >= 2
    assert b.runs == [] and b.stats.claimed == 0, "B took over a lease that was being renewed"
    assert_validated_with_its_reservation(migrated_url, order_id, 10)


def test_an_event_whose_lease_ran_out_in_the_queue_is_handed_back_unstarted(
    migrated_url: str, instances: Callable[..., Instance]
) -> None:
    set_stock(migrated_url, 10)
    first, second = place(migrated_url, 1), place(migrated_url, 1)
    # One worker: the first event runs and pauses (the process stalls), the second waits in the
    # queue, claimed in the same round, until its lease has run out.
    stalled = Hooks(pause_at="after_reserve")
    a = instances(DispatcherSettings(workers=1, poll_interval_s=0.05, lease_s=0.5), stalled)
    a.dispatcher.start()
    wait_until(stalled.paused.is_set, timeout=10, what="the first step to pause")
    assert a.stats.claimed == 2, "the second event waits in the queue"
    wait_until(lambda: lease_ran_out(migrated_url, second), timeout=10, interval=0.05, what="lease to end")

    stalled.resume()

    wait_until(lambda: a.stats.done == 2, timeout=10, what="both orders to settle")
    _, second_event, _, _ = rows(migrated_url, second)
    assert ("expired", second_event.id) in a.outcomes, "a step whose lease had run out was started"
    assert a.runs.count(second_event.id) == 1, "it ran once, after it was claimed again"
    assert second_event.attempts == 1, "handing it back gave its attempt back"
    for order_id in (first, second):
        assert rows(migrated_url, order_id)[0].status == "VALIDATED"
    check_invariants(migrated_url, migrated_url, {SKU: 10})


def test_a_claim_counts_the_attempt_and_an_event_out_of_attempts_is_buried_unrun(
    migrated_url: str, instances: Callable[..., Instance]
) -> None:
    order_id = place(migrated_url, 1)
    engine = make_engine(migrated_url)
    try:
        with OrdersUnitOfWork(engine) as uow:
            (claimed,) = uow.outbox.claim(5, timedelta(seconds=30), utcnow())
            uow.commit()
        assert (claimed.attempts, claimed.claims) == (1, 1), "the claim counted the attempt"
        # That attempt never ends (its process died): the lease runs out, as do two more.
        run_out = update(outbox_events).values(locked_until=utcnow() - timedelta(seconds=1))
        for _ in range(2):
            with OrdersUnitOfWork(engine) as uow:
                uow.connection.execute(run_out)
                (claimed,) = uow.outbox.claim(5, timedelta(seconds=30), utcnow())
                uow.commit()
        with engine.begin() as c:
            c.execute(run_out)
    finally:
        engine.dispose()
    assert (claimed.attempts, claimed.claims) == (3, 3)

    a = instances(DispatcherSettings(workers=1, poll_interval_s=0.05, max_attempts=3), Hooks())
    a.dispatcher.start()

    wait_until(lambda: a.stats.dead == 1, timeout=10, what="the event to be buried")
    _, event, _, _ = rows(migrated_url, order_id)
    assert a.runs == [], "an event out of attempts must not run again"
    assert (event.status, event.attempts, event.claims) == ("DEAD", 4, 4)
    assert event.last_error == "attempt 3 did not finish: its lease ran out (the process died or stalled)"


@pytest.mark.postgres
def test_a_dispatcher_whose_clock_runs_a_minute_ahead_steals_no_lease(
    make_pg_database: Callable[[], str], instances: Callable[..., Instance]
) -> None:
    url = apply_schema(make_pg_database())
    set_stock(url, 10)
    held = place(url, 1)
    stalled = Hooks(pause_at="after_reserve")
    a = instances(DispatcherSettings(workers=1, poll_interval_s=0.05, lease_s=10.0), stalled, url=url)
    a.dispatcher.start()
    wait_until(stalled.paused.is_set, timeout=10, what="A's step to pause, its lease held")
    _, before, _, _ = rows(url, held)
    ahead = instances(
        DispatcherSettings(workers=1, poll_interval_s=0.05),
        Hooks(),
        url=url,
        clock=lambda: utcnow() + timedelta(seconds=60),
    )
    ahead.dispatcher.start()
    other = place(url, 1)  # proof that the fast clock's dispatcher claims what is free

    wait_until(lambda: ahead.stats.done == 1, timeout=10, what="the other order to settle")
    _, after, _, _ = rows(url, held)
    assert ahead.runs == [rows(url, other)[1].id], "a lease still held was taken"
    assert after.lease_token == before.lease_token

    stalled.resume()
    wait_until(lambda: a.stats.done == 1, timeout=10, what="A to settle its order")
    assert {rows(url, order_id)[0].status for order_id in (held, other)} == {"VALIDATED"}


def test_events_whose_last_attempt_did_not_finish_run_one_at_a_time_and_alone(
    migrated_url: str, instances: Callable[..., Instance]
) -> None:
    set_stock(migrated_url, 100)
    orders = [place(migrated_url, 1) for _ in range(4)]
    engine = make_engine(migrated_url)
    try:  # a process claimed them all and died: every lease runs out unfinished
        with OrdersUnitOfWork(engine) as uow:
            assert len(uow.outbox.claim(10, timedelta(seconds=30), utcnow())) == 4
            uow.connection.execute(update(outbox_events).values(locked_until=utcnow() - timedelta(seconds=1)))
            uow.commit()
    finally:
        engine.dispose()
    fresh = place(migrated_url, 1)  # and one that never ran
    running: list[int] = []
    overlaps: list[tuple[int, ...]] = []
    lock = threading.Lock()

    class Watched(Hooks):
        def maybe_stall(self, boundary: str) -> None:
            if boundary == "before_reserve":
                with lock:
                    running.append(1)
                    if len(running) > 1:
                        overlaps.append(tuple(running))
                threading.Event().wait(0.05)  # long enough for a second step to start beside it
                with lock:
                    running.pop()

    a = instances(DispatcherSettings(workers=4, poll_interval_s=0.05), Watched())
    a.dispatcher.start()

    wait_until(lambda: a.stats.done == 5, timeout=15, what="every order to settle")
    assert overlaps == [], "a step whose last attempt did not finish ran beside another"
    for order_id in [*orders, fresh]:
        assert rows(migrated_url, order_id)[0].status == "VALIDATED"
    assert {rows(migrated_url, order_id)[1].attempts for order_id in orders} == {2}
    assert rows(migrated_url, fresh)[1].attempts == 1
