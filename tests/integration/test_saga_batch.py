"""The set-based saga, on both backends: a dispatcher round's ORDER_CREATED events go to one call of the
saga, which reserves for all of them in one inventory transaction and settles them in one orders
transaction, while each event keeps the verdict it would get alone.

- A batch of mixed outcomes: reserved, refused (short, unknown SKU), superseded by a newer step of
  its order, redelivered; through the guard as one breaker call.
- Rate permits: a batch that gets fewer permits than orders runs the first ones and defers the rest
  without spending their attempts.
- Through the dispatcher: a hot SKU in one batch goes in event order with no oversell; suspects are
  never batched; and the deterministic interleavings of test_stale_steps.py with batches: a stale
  batch, paused past its lease after its reservation, changes nothing once another dispatcher has
  taken its events over, whether it had reserved or refused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from db.engine import make_engine
from db.inventory import InventoryUnitOfWork
from db.outbox import ClaimedEvent
from db.tables import orders, outbox_events
from db.unit_of_work import OrdersUnitOfWork
from domain.fencing import Fence
from domain.inventory import insufficient_stock, unknown_sku
from domain.model import Order, OrderItem, utcnow
from saga.dispatcher import DispatcherSettings
from saga.inventory import InventoryParticipant, InventorySaga, SagaSettings
from saga.resilience import ConcurrentCircuitBreaker, Guard, RateLimiter
from saga.verdicts import Completed, Defer
from tests.integration.test_saga_statements import reservations, set_stock, stock_levels
from tests.integration.test_stale_steps import Hooks, Instance, lease_ran_out
from tests.invariants import check_invariants
from tests.support import wait_until


@pytest.fixture
def url(migrated_url: str) -> str:
    return migrated_url


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    yield engine
    engine.dispose()


def place_all(engine: Engine, baskets: list[list[tuple[str, int]]]) -> list[str]:
    """Orders in the given order (their events' ids grow in it)."""
    order_ids = []
    for n, basket in enumerate(baskets):
        order, placed = Order.place(f"c-{n}", tuple(OrderItem(s, q) for s, q in basket), now=utcnow())
        with OrdersUnitOfWork(engine) as uow:
            uow.add_order(order, None, [placed], f"corr-{n}")
            uow.commit()
        order_ids.append(order.order_id)
    return order_ids


def claim_all(engine: Engine) -> list[ClaimedEvent]:
    with OrdersUnitOfWork(engine) as uow:
        claimed = uow.outbox.claim(100, timedelta(seconds=60), utcnow())
        uow.commit()
    return claimed


def order_rows(engine: Engine, order_ids: list[str]) -> list[tuple[str, str]]:
    """(status, failure reason) of each order, in the order given."""
    with engine.connect() as connection:
        found = {r.id: (r.status, r.failure_reason) for r in connection.execute(select(orders))}
    return [found[order_id] for order_id in order_ids]


def event_statuses(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as connection:
        rows = connection.execute(select(outbox_events).order_by(outbox_events.c.id))
        return [(r.status, r.attempts) for r in rows]


class CountingBreaker(ConcurrentCircuitBreaker):
    def __init__(self) -> None:
        super().__init__(slow_call_s=60.0, fail_max=5, reset_timeout=1.0, name="batch")
        self.calls = 0

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super().call(func, *args, **kwargs)


def batch_saga(engine: Engine, rate: str = "100000/second") -> tuple[InventorySaga, CountingBreaker]:
    breaker = CountingBreaker()
    saga = InventorySaga(
        partial(OrdersUnitOfWork, engine),
        InventoryParticipant(partial(InventoryUnitOfWork, engine)),
        Guard(breaker, RateLimiter(rate)),
        SagaSettings(),
        batching=True,
    )
    return saga, breaker


def test_a_batch_of_mixed_outcomes_gives_each_event_the_verdict_it_would_get_alone(engine, url):
    set_stock(engine, {"HOT": 3, "B": 5})
    order_ids = place_all(
        engine,
        [
            [("HOT", 2)],  # reserved
            [("HOT", 2)],  # refused: 1 left
            [("B", 1)],  # superseded: a newer claim of its event wrote first
            [("GHOST", 1)],  # refused: unknown SKU
            [("HOT", 1), ("B", 2)],  # redelivered: reserved by an earlier step of its event
        ],
    )
    events = claim_all(engine)
    participant = InventoryParticipant(partial(InventoryUnitOfWork, engine))
    assert participant.reserve(order_ids[4], (OrderItem("HOT", 1), OrderItem("B", 2)), events[4].fence)
    # A newer claim of the third order's event (another dispatcher, after this lease ran out) has
    # reserved for it already.
    newer = Fence(events[2].id, events[2].claims + 1)
    assert participant.reserve(order_ids[2], (OrderItem("B", 1),), newer)
    saga, breaker = batch_saga(engine)

    verdicts = saga.batch_handlers()["ORDER_CREATED"](events)

    assert verdicts == {
        events[0].id: Completed(),
        events[1].id: Completed(),
        events[2].id: Completed(kept=False),
        events[3].id: Completed(),
        events[4].id: Completed(),
    }
    assert breaker.calls == 1, "the breaker sees one call per batch"
    assert order_rows(engine, order_ids) == [
        ("VALIDATED", ""),
        ("FAILED", insufficient_stock("HOT", 2, 0).reason),
        ("PENDING", ""),
        ("FAILED", unknown_sku("GHOST").reason),
        ("VALIDATED", ""),
    ]
    assert stock_levels(engine, ["HOT", "B"]) == {"HOT": (0, 3), "B": (2, 3)}, "the redelivery took nothing"
    assert event_statuses(engine) == [("DONE", 1), ("DONE", 1), ("PENDING", 1), ("DONE", 1), ("DONE", 1)]
    assert [r[2:] for r in reservations(engine) if r[0] == order_ids[2]] == [(1, "ACTIVE")], "the newer's"
    with OrdersUnitOfWork(engine) as uow:  # the newer step settles the order, as it would
        uow.connection.execute(update(outbox_events).values(status="DONE"))
        validated = update(orders).where(orders.c.id == order_ids[2]).values(status="VALIDATED", version=2)
        uow.connection.execute(validated)
        uow.commit()
    summary = check_invariants(url, url, {"HOT": 3, "B": 5})
    assert summary.orders_by_status == {"VALIDATED": 3, "FAILED": 2}


def test_a_batch_with_fewer_rate_permits_than_orders_runs_the_first_and_defers_the_rest(engine):
    set_stock(engine, {"A": 10})
    order_ids = place_all(engine, [[("A", 1)]] * 5)
    events = claim_all(engine)
    saga, breaker = batch_saga(engine, rate="3/minute")

    verdicts = saga.on_orders_created(events)

    assert [verdicts[e.id] == Completed() for e in events] == [True, True, True, False, False]
    for event in events[3:]:
        deferred = verdicts[event.id]
        assert isinstance(deferred, Defer) and deferred.reason == "rate limited"
    assert breaker.calls == 1
    assert [status for status, _ in order_rows(engine, order_ids)] == ["VALIDATED"] * 3 + ["PENDING"] * 2
    assert {r[0] for r in reservations(engine)} == set(order_ids[:3]), "the deferred took nothing"
    again = saga.on_orders_created(events[3:])
    assert {type(verdict) for verdict in again.values()} == {Defer}, "no permit left: all deferred"
    assert stock_levels(engine, ["A"]) == {"A": (7, 3)}


def instance(
    url: str, workers: int, hooks: Hooks | None = None, lease_s: float = 30.0, **kwargs: Any
) -> Instance:
    return Instance(
        url,
        DispatcherSettings(workers=workers, poll_interval_s=0.05, lease_s=lease_s),
        hooks or Hooks(),
        batching=True,
        **kwargs,
    )


@pytest.fixture
def instances(url: str) -> Iterator[Callable[..., Instance]]:
    made: list[Instance] = []

    def make(*args: Any, **kwargs: Any) -> Instance:
        made.append(instance(url, *args, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.dispatcher.stop(5.0)
        each.engine.dispose()


def test_a_hot_sku_in_one_batch_goes_in_event_order_and_is_never_oversold(engine, url, instances):
    set_stock(engine, {"HOT": 15})
    order_ids = place_all(engine, [[("HOT", 1)] if n % 3 else [("HOT", 2)] for n in range(40)])
    a = instances(workers=20)  # a round claims up to 2 x workers: all 40 at once

    a.dispatcher.start()

    wait_until(lambda: a.stats.done == 40, timeout=15, what="every order to settle")
    assert [len(batch) for batch in a.batches] == [40]
    left, expected = 15, []
    for n in range(40):  # what the same orders one after another in event order get
        wanted = 1 if n % 3 else 2
        expected.append("VALIDATED" if wanted <= left else "FAILED")
        left -= wanted if wanted <= left else 0
    assert [status for status, _ in order_rows(engine, order_ids)] == expected
    summary = check_invariants(url, url, {"HOT": 15})
    assert summary.stock == {"HOT": (0, 15)}


def test_suspect_events_are_never_batched(engine, url, instances):
    set_stock(engine, {"A": 100})
    suspects = place_all(engine, [[("A", 1)]] * 3)
    with OrdersUnitOfWork(engine) as uow:  # a process claimed them and died
        assert len(uow.outbox.claim(10, timedelta(seconds=30), utcnow())) == 3
        uow.connection.execute(update(outbox_events).values(locked_until=utcnow() - timedelta(seconds=1)))
        uow.commit()
    fresh = place_all(engine, [[("A", 1)]] * 4)
    a = instances(workers=8)

    a.dispatcher.start()

    wait_until(lambda: a.stats.done == 7, timeout=15, what="every order to settle")
    with engine.connect() as connection:
        rows = connection.execute(select(outbox_events.c.aggregate_id, outbox_events.c.id))
        ids = {row.aggregate_id: row.id for row in rows}
    suspect_ids = {ids[order_id] for order_id in suspects}
    assert a.batches, "the fresh events ran as a batch"
    assert all(not suspect_ids & set(batch) for batch in a.batches), a.batches
    assert {status for status, _ in order_rows(engine, suspects + fresh)} == {"VALIDATED"}


def stale_batch_against_a_live_one(
    engine: Engine, url: str, instances: Callable[..., Instance], before_takeover: Callable[[], None]
) -> tuple[list[str], Instance, Instance]:
    """A claims three orders' events as one batch and pauses right after its reservation (its
    process stalls: no renewal); once the database says its leases ran out, `before_takeover()`,
    then B takes the events over as a batch and settles them; then A resumes, stale."""
    order_ids = place_all(engine, [[("STALE", 1)], [("STALE", 2)], [("STALE", 3)]])
    stale = Hooks(pause_at="after_reserve")
    # Two workers: a round claims up to four events (all three, one batch), and with three held
    # A claims nothing more while it stalls (it would take its own events back).
    a = instances(workers=2, hooks=stale, lease_s=0.5)
    b = instances(workers=4)
    a.dispatcher.start()
    wait_until(stale.paused.is_set, timeout=10, what="A's batch to pause")
    assert [len(batch) for batch in a.batches] == [3]

    def leases_ran_out() -> bool:
        return all(lease_ran_out(url, order_id) for order_id in order_ids)

    wait_until(leases_ran_out, timeout=10, interval=0.05, what="A's leases to run out")
    before_takeover()
    b.dispatcher.start()
    wait_until(lambda: b.stats.done == 3, timeout=10, what="B to settle the orders")
    assert b.batches == [], "A's attempts never finished: B runs each event alone, as a suspect"
    stale.resume()
    wait_until(lambda: len(a.outcomes) == 3, timeout=10, what="A's stale batch to end")
    return order_ids, a, b


def test_a_stale_batch_that_reserved_changes_nothing_once_another_took_its_events_over(
    engine, url, instances
):
    set_stock(engine, {"STALE": 10})

    order_ids, a, b = stale_batch_against_a_live_one(engine, url, instances, lambda: None)

    assert [outcome for outcome, _ in a.outcomes] == ["fenced"] * 3
    # (a suspect claimed beside another goes back unrun, deferred, and comes back)
    assert [outcome for outcome, _ in b.outcomes if outcome != "deferred"] == ["done"] * 3
    assert order_rows(engine, order_ids) == [("VALIDATED", "")] * 3
    assert sorted((r[2], r[3]) for r in reservations(engine)) == [(1, "ACTIVE"), (2, "ACTIVE"), (3, "ACTIVE")]
    assert event_statuses(engine) == [("DONE", 2)] * 3
    check_invariants(url, url, {"STALE": 10})


def test_a_stale_batch_that_was_refused_closes_its_orders_for_its_reason_and_the_takeover_fails_them(
    engine, url, instances
):
    set_stock(engine, {"STALE": 0})
    # A is refused and closes the orders in the same transaction; the stock is refilled before B
    # takes over: B finds them closed and fails them for A's reason, never reserving late.
    order_ids, a, b = stale_batch_against_a_live_one(
        engine, url, instances, lambda: set_stock(engine, {"STALE": 10})
    )

    assert [outcome for outcome, _ in a.outcomes] == ["fenced"] * 3
    # (a suspect claimed beside another goes back unrun, deferred, and comes back)
    assert [outcome for outcome, _ in b.outcomes if outcome != "deferred"] == ["done"] * 3
    assert order_rows(engine, order_ids) == [
        ("FAILED", insufficient_stock("STALE", quantity, 0).reason) for quantity in (1, 2, 3)
    ]
    assert {r[3] for r in reservations(engine)} == {"RELEASED"}
    assert stock_levels(engine, ["STALE"]) == {"STALE": (10, 0)}
    check_invariants(url, url, {"STALE": 10})


def test_a_live_slow_batch_keeps_every_lease_by_renewing_them(engine, url, instances):
    set_stock(engine, {"A": 10})
    order_ids = place_all(engine, [[("A", 1)]] * 3)
    slow = Hooks(settle_delay_s=2.0)  # four leases long; slow, not stalled: leases are renewed
    a = instances(workers=4, hooks=slow, lease_s=0.5)
    b = instances(workers=4, lease_s=0.5)
    a.dispatcher.start()
    wait_until(lambda: a.batches, timeout=10, what="A to start its batch")
    b.dispatcher.start()

    wait_until(lambda: len(a.outcomes) == 3, timeout=10, what="A's batch to end")

    assert [outcome for outcome, _ in a.outcomes] == ["done"] * 3
    assert a.dispatcher.renewed_leases >= 6, "every event of the batch renewed, more than once"
    assert b.runs == [], "B took over a lease that was being renewed"
    assert order_rows(engine, order_ids) == [("VALIDATED", "")] * 3
    assert event_statuses(engine) == [("DONE", 1)] * 3


def test_a_batch_whose_leases_ran_out_before_it_started_is_handed_back_unstarted(engine, url, instances):
    set_stock(engine, {"A": 10})
    order_ids = place_all(engine, [[("A", 1)]] * 3)
    stalled = threading.Event()

    def stall_once(event: ClaimedEvent, _lag_s: float) -> None:
        """The round thread stalls as the first batch is queued, past its leases (renewing none)."""
        if not stalled.is_set():
            stalled.set()
            wait_until(lambda: all(lease_ran_out(url, o) for o in order_ids), timeout=10, what="leases")

    # Two workers: a round claims all three (one batch), and with three held no other round claims
    # while this one stalls (it would take the events back itself).
    a = instances(workers=2, hooks=Hooks(lease_renewal_off=True), lease_s=0.3, on_claimed=stall_once)

    a.dispatcher.start()

    wait_until(lambda: a.stats.done == 3, timeout=15, what="every order to settle")
    expired = [event_id for outcome, event_id in a.outcomes if outcome == "expired"]
    assert len(expired) == 3, f"every event of the stalled batch was handed back: {a.outcomes}"
    assert [len(batch) for batch in a.batches] == [3], "the batch ran once, claimed again"
    assert event_statuses(engine) == [("DONE", 1)] * 3, "handing back gave each its attempt back"
    assert order_rows(engine, order_ids) == [("VALIDATED", "")] * 3
