"""Many dispatchers on one PostgreSQL database (DESIGN.md, "Claiming events with many processes").

- Two dispatchers, each with its own engine, guard and saga (as two processes would have), claim
  from one outbox: no event runs on both at once, every event is DONE exactly once, and the
  inventory effects (reservations, stock) happen exactly once.
- Fencing: a dispatcher that stalls past its lease loses the event to the other one; its late
  completion is refused ("lease lost"), and the event is DONE once with its effects applied once.
- The same with two real `orders-server` processes over gRPC.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest
from sqlalchemy import Engine, select

from db.engine import EngineSettings, make_engine
from db.inventory import InventoryUnitOfWork
from db.outbox import ClaimedEvent
from db.tables import order_items, orders, outbox_events, stock, stock_reservations
from db.unit_of_work import OrdersUnitOfWork
from saga.dispatcher import DispatcherSettings, OutboxDispatcher
from saga.inventory import InventoryParticipant, InventorySaga, SagaSettings
from saga.resilience import ConcurrentCircuitBreaker, Guard, RateLimiter
from saga.verdicts import Handler, Verdict
from server.faults import FaultSwitches, FaultyParticipant, faulty_handlers
from tests.support import Stubs, apply_schema, wait_until

pytestmark = pytest.mark.postgres

SKUS = ("SKU-A", "SKU-B", "SKU-C", "SKU-D")
INITIAL_STOCK = 60  # well below the demand of 200 orders: some must fail, none may oversell


@pytest.fixture
def pg_url(make_pg_database: Callable[[], str]) -> str:
    """A fresh PostgreSQL database with both schemas, as `orders-server migrate` leaves it."""
    return apply_schema(make_pg_database())


class RunLog:
    """Handler runs and recorded outcomes of every dispatcher, keyed by outbox event id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: Counter[int] = Counter()
        self.overlaps: list[int] = []  # event ids seen running in two handlers at once
        self.runs: dict[str, Counter[int]] = defaultdict(Counter)  # process -> event id -> runs
        self.outcomes: dict[int, list[tuple[str, str]]] = defaultdict(list)  # id -> [(process, outcome)]

    def wrap(self, process: str, handler: Handler) -> Handler:
        def run(event: ClaimedEvent) -> Verdict:
            with self._lock:
                self._running[event.id] += 1
                if self._running[event.id] > 1:
                    self.overlaps.append(event.id)
                self.runs[process][event.id] += 1
            try:
                return handler(event)
            finally:
                with self._lock:
                    self._running[event.id] -= 1

        return run

    def listener(self, process: str) -> Callable[[str, ClaimedEvent, float], None]:
        def record(outcome: str, event: ClaimedEvent, _seconds: float) -> None:
            with self._lock:
                self.outcomes[event.id].append((process, outcome))

        return record

    def total_runs(self, event_id: int) -> int:
        with self._lock:
            return sum(runs[event_id] for runs in self.runs.values())


class DispatcherProcess:
    """What one server process has for the saga: its own engine, guard, saga and dispatcher."""

    def __init__(
        self, name: str, url: str, settings: DispatcherSettings, runs: RunLog, fault_file: str = ""
    ) -> None:
        self.name = name
        self.engine = make_engine(url, EngineSettings(pool_size=settings.workers + 4))
        faults = FaultSwitches(fault_file)
        orders_uow = partial(OrdersUnitOfWork, self.engine)
        guard = Guard(
            ConcurrentCircuitBreaker(slow_call_s=60.0, fail_max=5, reset_timeout=1.0, name=name),
            RateLimiter("100000/second"),
        )
        saga = InventorySaga(
            orders_uow,
            FaultyParticipant(InventoryParticipant(partial(InventoryUnitOfWork, self.engine)), faults),
            guard,
            SagaSettings(max_attempts=settings.max_attempts),
        )
        handlers = {event_type: runs.wrap(name, h) for event_type, h in saga.handlers().items()}
        self.dispatcher = OutboxDispatcher(
            orders_uow,
            faulty_handlers(handlers, faults),
            settings,
            listener=runs.listener(name),
            renewal_paused=faults.renewal_paused,
        )
        self.started = False

    @property
    def stats(self) -> Any:
        return self.dispatcher.stats

    def start(self) -> None:
        self.dispatcher.start()
        self.started = True

    def stop(self) -> None:
        if self.started:
            self.dispatcher.stop(5.0)
        self.engine.dispose()


@pytest.fixture
def dispatchers(pg_url: str) -> Iterator[Callable[..., DispatcherProcess]]:
    """Factory of dispatcher "processes" on the test database; all stopped before it is dropped."""
    made: list[DispatcherProcess] = []

    def make(
        name: str, settings: DispatcherSettings, runs: RunLog, fault_file: str = ""
    ) -> DispatcherProcess:
        process = DispatcherProcess(name, pg_url, settings, runs, fault_file)
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop()


def random_orders(count: int, seed: int = 7) -> list[list[tuple[str, int]]]:
    rng = random.Random(seed)
    return [
        [(sku, rng.randint(1, 3)) for sku in sorted(rng.sample(SKUS, rng.randint(1, 2)))]
        for _ in range(count)
    ]


def place_all(stubs: list[Stubs], baskets: list[list[tuple[str, int]]]) -> list[str]:
    """Place every basket from several client threads, spread over the given servers."""

    def place(index: int) -> str:
        return stubs[index % len(stubs)].place(f"customer-{index % 17}", baskets[index]).order_id

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(place, range(len(baskets))))


def settled(engine: Engine) -> bool:
    with engine.connect() as connection:
        statuses = set(connection.execute(select(orders.c.status)).scalars())
        events = set(connection.execute(select(outbox_events.c.status)).scalars())
    return bool(statuses) and "PENDING" not in statuses and events == {"DONE"}


def assert_effects_exactly_once(
    engine: Engine, order_ids: list[str], initial: dict[str, int], claims: int = 1
) -> Counter[str]:
    """DESIGN.md invariants 1-3 on the rows: stock conserved, no oversell, VALIDATED <=> reserved;
    every event claimed `claims` times (each claim an attempt)."""
    with engine.connect() as connection:
        status = {r.id: r.status for r in connection.execute(select(orders.c.id, orders.c.status))}
        items: dict[str, dict[str, int]] = defaultdict(dict)
        for r in connection.execute(select(order_items)):
            items[r.order_id][r.sku] = r.quantity
        reservations: dict[str, dict[str, tuple[int, str]]] = defaultdict(dict)
        rows = 0
        for r in connection.execute(select(stock_reservations)):
            reservations[r.order_id][r.sku] = (r.quantity, r.status)
            rows += 1
        levels = {r.sku: (r.available, r.reserved) for r in connection.execute(select(stock))}
        events = list(connection.execute(select(outbox_events)))

    assert set(status) == set(order_ids)
    assert len(events) == len(order_ids)
    assert {e.status for e in events} == {"DONE"}
    assert {e.attempts for e in events} == {claims}
    assert {e.lease_token for e in events} == {None}
    assert Counter(e.aggregate_id for e in events) == Counter({order_id: 1 for order_id in order_ids})
    # One reservation row per (order, sku) at most, and only for SKUs the order has.
    assert rows == sum(len(r) for r in reservations.values())
    for order_id, state in status.items():
        held = reservations.get(order_id, {})
        assert set(held) <= set(items[order_id])
        active = {sku: q for sku, (q, s) in held.items() if s == "ACTIVE"}
        if state == "VALIDATED":
            assert active == items[order_id], f"order {order_id} is VALIDATED without its reservations"
        else:
            assert state == "FAILED" and not active, f"order {order_id} is {state} and still holds {active}"
    for sku, start in initial.items():
        available, reserved = levels[sku]
        active_total = sum(
            q for held in reservations.values() for s, (q, st) in held.items() if s == sku and st == "ACTIVE"
        )
        assert available >= 0, f"{sku} oversold"
        assert reserved == active_total, f"{sku}: reserved {reserved} but reservations hold {active_total}"
        assert available + active_total == start, f"{sku}: stock not conserved"
    return Counter(status.values())


def test_two_dispatchers_on_one_database_never_run_an_event_twice(pg_url, dispatchers, start_server):
    server = start_server(database_url=pg_url, saga_workers=0, migrate_on_start="never")
    for sku in SKUS:
        server.stubs.set_stock(sku, INITIAL_STOCK)
    runs = RunLog()
    settings = DispatcherSettings(workers=4, poll_interval_s=0.01, lease_s=30.0)
    a = dispatchers("A", settings, runs)
    b = dispatchers("B", settings, runs)
    a.start()
    b.start()

    order_ids = place_all([server.stubs], random_orders(200))

    engine = server.service.engines.orders
    # The row turns DONE at the commit; the dispatcher's counters and listener follow just after it.
    wait_until(
        lambda: settled(engine) and a.stats.done + b.stats.done == len(order_ids),
        timeout=25,
        what="every order settled and every event DONE",
    )
    outcome_counts = assert_effects_exactly_once(engine, order_ids, dict.fromkeys(SKUS, INITIAL_STOCK))

    assert runs.overlaps == [], "an event ran on two dispatchers at once"
    event_ids = set(runs.outcomes)
    assert len(event_ids) == len(order_ids)
    for event_id in event_ids:
        assert runs.total_runs(event_id) == 1, f"event {event_id} ran {runs.total_runs(event_id)} times"
        assert [outcome for _, outcome in runs.outcomes[event_id]] == ["done"]
    assert a.stats.done + b.stats.done == len(order_ids)
    assert a.stats.fenced == b.stats.fenced == 0
    assert a.stats.done > 0 and b.stats.done > 0, "both dispatchers must have competed for the events"
    assert outcome_counts["VALIDATED"] > 0 and outcome_counts["FAILED"] > 0
    print(f"\ntwo dispatchers: A done {a.stats.done}, B done {b.stats.done}, orders {dict(outcome_counts)}")


@pytest.mark.parametrize(
    "stall",
    ["settle_delay_s", "inventory_delay_s"],
    ids=["stalls-after-its-effects", "stalls-before-its-effects"],
)
def test_a_dispatcher_that_outlives_its_lease_is_fenced_and_the_effects_happen_once(
    pg_url, dispatchers, start_server, tmp_path, caplog, stall
):
    caplog.set_level(logging.WARNING, logger="orders.dispatcher")
    caplog.set_level(logging.WARNING, logger="orders.saga")
    lease_s, stall_s = 0.5, 2.0
    server = start_server(database_url=pg_url, saga_workers=0, migrate_on_start="never")
    for sku in SKUS:
        server.stubs.set_stock(sku, INITIAL_STOCK)
    fault_file = tmp_path / "faults-a.json"
    # The stall stands for the whole process stalling: its dispatcher renews no lease meanwhile.
    fault_file.write_text(json.dumps({stall: stall_s, "lease_renewal_off": True}))
    runs = RunLog()
    # A: one worker (so it claims nothing else while stalled) and a lease shorter than its stall.
    a = dispatchers(
        "A", DispatcherSettings(workers=1, poll_interval_s=0.05, lease_s=lease_s), runs, str(fault_file)
    )
    b = dispatchers("B", DispatcherSettings(workers=2, poll_interval_s=0.05, lease_s=30.0), runs)
    a.start()

    [order_id] = place_all([server.stubs], [[("SKU-A", 2), ("SKU-B", 3)]])

    wait_until(lambda: a.stats.claimed == 1, what="A to claim the event")
    b.start()
    wait_until(
        lambda: a.stats.fenced == 1 and b.stats.done == 1,
        timeout=10,
        what="A's late completion to be refused",
    )

    [event_id] = runs.outcomes
    assert runs.outcomes[event_id] == [("B", "done"), ("A", "fenced")]
    assert runs.runs["A"][event_id] == runs.runs["B"][event_id] == 1, "B must have re-run the event"
    assert a.stats.done == 0 and b.stats.done == 1
    # Fenced at the DONE (the dispatcher says so), or earlier at the inventory (the saga does).
    assert any(
        ("lease lost" in r.getMessage() and r.name == "orders.dispatcher")
        or ("this one wrote nothing" in r.getMessage() and r.name == "orders.saga")
        for r in caplog.records
    )
    engine = server.service.engines.orders
    assert settled(engine)
    assert_effects_exactly_once(engine, [order_id], dict.fromkeys(SKUS, INITIAL_STOCK), claims=2)
    with engine.connect() as connection:
        order = connection.execute(select(orders).where(orders.c.id == order_id)).one()
        held = connection.execute(
            select(stock_reservations.c.sku, stock_reservations.c.quantity, stock_reservations.c.status)
        ).all()
        levels = {r.sku: r.available for r in connection.execute(select(stock.c.sku, stock.c.available))}
    assert (order.status, order.version) == ("VALIDATED", 2), "the order moved once"
    assert sorted(tuple(r) for r in held) == [("SKU-A", 2, "ACTIVE"), ("SKU-B", 3, "ACTIVE")]
    assert levels == {"SKU-A": INITIAL_STOCK - 2, "SKU-B": INITIAL_STOCK - 3, "SKU-C": 60, "SKU-D": 60}


_SAGA_LINE = re.compile(r"order_id=(\S+) .*(stock reserved for order|cannot be reserved)")


def test_two_server_processes_on_one_database_settle_every_order_exactly_once(pg_url, spawn_server):
    flags = ("--database-url", pg_url, "--migrate-on-start", "never", "--saga-workers", "4")
    first = spawn_server(*flags)
    second = spawn_server(*flags)
    for sku in SKUS:
        first.stubs.set_stock(sku, INITIAL_STOCK)

    order_ids = place_all([first.stubs, second.stubs], random_orders(200, seed=11))

    engine = make_engine(pg_url)
    try:
        wait_until(lambda: settled(engine), timeout=25, what="every order settled and every event DONE")
        outcome_counts = assert_effects_exactly_once(engine, order_ids, dict.fromkeys(SKUS, INITIAL_STOCK))
    finally:
        engine.dispose()

    logs = {"first": first.log(), "second": second.log()}
    reached_inventory: Counter[str] = Counter()
    per_process: Counter[str] = Counter()
    for name, text in logs.items():
        for match in _SAGA_LINE.finditer(text):
            reached_inventory[match.group(1)] += 1
            per_process[name] += 1
        assert "lease lost" not in text
        assert "Traceback" not in text
    assert reached_inventory == Counter(dict.fromkeys(order_ids, 1)), "an order was reserved twice or never"
    assert per_process["first"] > 0 and per_process["second"] > 0, "both processes must have dispatched"
    print(f"\ntwo processes: {dict(per_process)} saga runs, orders {dict(outcome_counts)}")
