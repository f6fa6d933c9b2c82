"""The guards of the inventory call in a real server over gRPC (DESIGN.md, "Life of a request" step 4).

- An inventory outage (errors, or calls slower than `breaker_slow_call_s`) opens the circuit breaker;
  while it is open the saga defers its events, which does not use up attempts, so no order fails
  because of the outage; once the inventory is back a probe closes the breaker and every order is
  settled.
- The rate limiter bounds inventory calls per second; the events over the limit are deferred, not
  lost and not failed.

Faults are switched on the running server through its fault file; every wait is on an observed
state (breaker transitions from a pybreaker listener, rows, counters), never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pybreaker
from sqlalchemy import select

from db.tables import orders, outbox_events, stock, stock_reservations
from saga.resilience import SlowCallError
from server.faults import InjectedFaultError
from tests.support import wait_until

SKU = "SKU-1"
INITIAL_STOCK = 1_000


def set_faults(path: Path, **faults: Any) -> None:
    """Replace the fault file in one step: a reader never sees it half written."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(faults))
    os.replace(scratch, path)


class BreakerWatch(pybreaker.CircuitBreakerListener):
    """Transitions and failures of the server's breaker, as its listeners see them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.states: list[str] = []
        self.failures: list[BaseException] = []

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        with self._lock:
            self.states.append(new_state.name)

    def failure(self, cb: Any, exc: BaseException) -> None:
        with self._lock:
            self.failures.append(exc)

    @property
    def trips(self) -> int:
        with self._lock:
            return self.states.count(pybreaker.STATE_OPEN)

    @property
    def failed_probes(self) -> int:
        """half-open -> open: a probe that failed and reopened the breaker."""
        with self._lock:
            return sum(
                1
                for before, after in zip(self.states, self.states[1:], strict=False)
                if (before, after) == (pybreaker.STATE_HALF_OPEN, pybreaker.STATE_OPEN)
            )


def place_orders(server: Any, count: int) -> list[str]:
    """Place `count` one-item orders at once from several client threads."""
    with ThreadPoolExecutor(8) as pool:
        placed = list(pool.map(lambda i: server.stubs.place(f"customer-{i}", [(SKU, 1)]), range(count)))
    return [order.order_id for order in placed]


def statuses(server: Any) -> dict[str, str]:
    with server.service.engines.orders.connect() as connection:
        return {row.id: row.status for row in connection.execute(select(orders.c.id, orders.c.status))}


def all_validated(server: Any) -> bool:
    """Every order VALIDATED and every event recorded DONE (the order settles before its event)."""
    return set(statuses(server).values()) == {"VALIDATED"} and {
        row.status for row in created_events(server).values()
    } == {"DONE"}


def created_events(server: Any) -> dict[str, Any]:
    """order id -> its ORDER_CREATED outbox row."""
    query = select(outbox_events).where(outbox_events.c.event_type == "ORDER_CREATED")
    with server.service.engines.orders.connect() as connection:
        return {row.aggregate_id: row for row in connection.execute(query)}


def used_attempts(row: Any) -> int:
    """Attempts an event has used up: a claim counts one at once, so an event held right now
    (leased, PENDING) has one that is not used up yet; a deferral gives its attempt back."""
    return int(row.attempts) - (1 if row.status == "PENDING" and row.lease_token is not None else 0)


def stock_state(server: Any) -> tuple[int, int, int]:
    """(available, reserved, active reservation rows) of SKU."""
    with server.service.engines.inventory.connect() as connection:
        level = connection.execute(
            select(stock.c.available, stock.c.reserved).where(stock.c.sku == SKU)
        ).one()
        active = connection.execute(
            select(stock_reservations.c.order_id).where(
                stock_reservations.c.sku == SKU, stock_reservations.c.status == "ACTIVE"
            )
        ).all()
    return level.available, level.reserved, len(active)


def assert_all_validated_once(server: Any, order_ids: list[str]) -> None:
    assert set(statuses(server).values()) == {"VALIDATED"}
    events = created_events(server)
    assert set(events) == set(order_ids)
    assert {row.status for row in events.values()} == {"DONE"}, "an event was lost or buried"
    n = len(order_ids)
    assert stock_state(server) == (INITIAL_STOCK - n, n, n), "stock must be reserved exactly once per order"


def test_an_inventory_outage_opens_the_breaker_defers_events_without_using_attempts_and_recovers(
    database_url, start_server, tmp_path
):
    fail_max, n = 3, 8
    faults = tmp_path / "faults.json"
    set_faults(faults, inventory_error=True)
    server = start_server(
        database_url=database_url, fault_file=str(faults), breaker_fail_max=fail_max, breaker_reset_s=0.5
    )
    breaker, dispatcher = server.service.guard.breaker, server.service.dispatcher
    watch = BreakerWatch()
    breaker.add_listener(watch)
    server.stubs.set_stock(SKU, INITIAL_STOCK)

    order_ids = place_orders(server, n)

    wait_until(lambda: watch.trips >= 1, what="the breaker to open")
    assert breaker.current_state in (pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN)
    # Keep the outage through a failed probe and many deferrals of every event.
    wait_until(
        lambda: watch.failed_probes >= 1 and dispatcher.stats.deferred >= 2 * n,
        timeout=10,
        what="a failed half-open probe and deferrals",
    )
    events = created_events(server)
    assert set(statuses(server).values()) == {"PENDING"}, "an outage alone must not settle orders"
    assert {row.status for row in events.values()} == {"PENDING"}
    # Only failures that left the breaker closed are attempts: the one that trips it and every failed
    # half-open probe mean "outage", which defers without using an attempt.
    attempts = {order_id: used_attempts(row) for order_id, row in events.items()}
    assert sum(attempts.values()) <= fail_max - 1, attempts
    assert sum(attempts.values()) < len(watch.failures)
    assert dispatcher.stats.dead == 0
    assert stock_state(server) == (INITIAL_STOCK, 0, 0)
    print(
        f"\noutage: trips={watch.trips} failed_probes={watch.failed_probes} "
        f"deferred={dispatcher.stats.deferred} retried={dispatcher.stats.retried} attempts={attempts}"
    )

    set_faults(faults)

    wait_until(
        lambda: all_validated(server) and breaker.current_state == pybreaker.STATE_CLOSED,
        timeout=15,
        what="every order VALIDATED and the breaker closed",
    )
    assert_all_validated_once(server, order_ids)
    # Every attempt on record but each event's last, which succeeded, is one failed inventory call;
    # the many deferrals counted none.
    final = {order_id: row.attempts - 1 for order_id, row in created_events(server).items()}
    assert all(isinstance(error, InjectedFaultError) for error in watch.failures)
    assert sum(final.values()) == dispatcher.stats.retried <= fail_max - 1
    assert len(watch.failures) >= fail_max + watch.failed_probes
    assert watch.states[-1] == pybreaker.STATE_CLOSED
    assert dispatcher.stats.dead == dispatcher.stats.fenced == 0


def test_slow_inventory_calls_open_the_breaker_and_orders_wait_until_it_is_fast_again(
    database_url, start_server, tmp_path
):
    # The breaker counts calls, and on PostgreSQL a batch of orders is one call: enough orders that
    # the three slow calls which trip it leave many behind.
    n = 30
    faults = tmp_path / "faults.json"
    set_faults(faults, inventory_delay_s=0.3)
    server = start_server(
        database_url=database_url,
        fault_file=str(faults),
        breaker_fail_max=3,
        breaker_reset_s=0.5,
        breaker_slow_call_s=0.1,
        saga_workers=2,  # few calls in flight: most orders are still waiting when the breaker trips
    )
    breaker, dispatcher = server.service.guard.breaker, server.service.dispatcher
    watch = BreakerWatch()
    breaker.add_listener(watch)
    server.stubs.set_stock(SKU, INITIAL_STOCK)

    order_ids = place_orders(server, n)

    wait_until(lambda: watch.trips >= 1, what="slow calls to open the breaker")
    wait_until(lambda: watch.failed_probes >= 1, timeout=10, what="a slow probe to reopen the breaker")
    pending = [s for s in statuses(server).values() if s == "PENDING"]
    assert pending, "the open breaker must hold orders back"
    # Slow calls succeeded: what they reserved is used, and no event lost an attempt to them.
    assert watch.failures and all(isinstance(error, SlowCallError) for error in watch.failures)
    assert {used_attempts(row) for row in created_events(server).values() if row.status == "PENDING"} == {0}
    assert dispatcher.stats.deferred > 0
    held_back = len(pending)

    set_faults(faults)

    wait_until(
        lambda: all_validated(server) and breaker.current_state == pybreaker.STATE_CLOSED,
        timeout=15,
        what="every order VALIDATED and the breaker closed",
    )
    assert_all_validated_once(server, order_ids)
    assert {row.attempts for row in created_events(server).values()} == {1}, "one attempt each: the last"
    assert dispatcher.stats.retried == dispatcher.stats.dead == 0
    print(f"\nslow calls: trips={watch.trips} held back while open={held_back}/{n}")


def test_the_rate_limiter_spreads_inventory_calls_and_loses_no_order(database_url, start_server):
    n, per_second = 30, 5
    server = start_server(database_url=database_url, inventory_rate=f"{per_second}/second")
    service = server.service
    server.stubs.set_stock(SKU, INITIAL_STOCK)
    limiter = service.guard.limiter
    admitted: list[float] = []
    acquire_up_to = limiter.acquire_up_to

    def recording_acquire_up_to(wanted: int) -> int:
        granted = acquire_up_to(wanted)  # a permit per order, of a batch or alone: each recorded
        admitted.extend([time.time()] * granted)
        return granted

    limiter.acquire_up_to = recording_acquire_up_to

    order_ids = place_orders(server, n)

    wait_until(
        lambda: all_validated(server),
        timeout=25,
        what="every order VALIDATED",
    )
    assert_all_validated_once(server, order_ids)
    assert {row.attempts for row in created_events(server).values()} == {1}, "deferrals are not attempts"
    assert service.dispatcher.stats.deferred > 0
    assert service.dispatcher.stats.retried == service.dispatcher.stats.dead == 0

    # Permits taken (one per order): never more than the limit in any one-second window.
    admitted.sort()
    assert len(admitted) == n
    busiest = max(sum(1 for t in admitted if start <= t < start + 1.0) for start in admitted)
    assert busiest <= per_second

    # Completions as clients see them (update_time of the VALIDATED orders).
    with service.engines.orders.connect() as connection:
        settled = sorted(connection.execute(select(orders.c.update_time)).scalars())
    span_s = (settled[-1] - settled[0]).total_seconds()
    rate = (n - 1) / span_s
    assert rate <= per_second * 1.2, f"{rate:.2f} orders/s through a {per_second}/second limit"
    print(
        f"\nlimiter: {n} orders settled in {span_s:.2f}s = {rate:.2f}/s; busiest 1s window: {busiest} calls; "
        f"deferrals: {service.dispatcher.stats.deferred}"
    )
