"""A long inventory outage must not decide outcomes: DESIGN.md step 4 says "an outage never burns
through retries or fails orders by itself", and invariant 2 says a CANCELLED or FAILED order
holds no active reservation.

The outage spans many more failed half-open probes than `max_attempts`: a failure that leaves
the breaker open is a deferral, not an attempt, so no release goes DEAD and no PENDING order
fails "inventory unavailable" because of the outage alone.
"""

from __future__ import annotations

import threading

import pybreaker
import pytest
from orders_service_api.v1 import orders_pb2 as pb

from tests.integration.helpers import rows_of
from tests.integration.saga_support import stock_of, wait_for_status, wait_settled_and_check, write_faults
from tests.support import wait_until

MAX_ATTEMPTS = 4
FAIL_MAX = 2


class FailedProbes(pybreaker.CircuitBreakerListener):
    """Counts half-open -> open transitions: probes that found the inventory still down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def state_change(self, cb, old_state, new_state) -> None:
        before = old_state.name if old_state is not None else None
        if (before, new_state.name) == (pybreaker.STATE_HALF_OPEN, pybreaker.STATE_OPEN):
            with self._lock:
                self.count += 1


@pytest.fixture
def outage_server(database_url, start_server, tmp_path):
    faults = tmp_path / "faults.json"
    write_faults(faults)
    server = start_server(
        database_url=database_url,
        fault_file=str(faults),
        max_attempts=MAX_ATTEMPTS,
        breaker_fail_max=FAIL_MAX,
        breaker_reset_s=0.1,
        poll_interval_s=0.05,
        retry_base_s=0.02,
        retry_max_s=0.1,
    )
    server.faults = faults
    server.probes = FailedProbes()
    server.service.guard.breaker.add_listener(server.probes)
    return server


def _outage_outlasts_the_attempts(server, order_id: str, event_type: str) -> None:
    """Keep the inventory down until more probes failed than the event had attempts, or it ended."""
    rows = rows_of(server)
    wait_until(
        lambda: (
            server.probes.count >= MAX_ATTEMPTS
            or any(e.status != "PENDING" for e in rows.events(order_id, event_type))
        ),
        timeout=10,
        what="a long outage",
    )


def test_a_cancel_during_a_long_outage_releases_the_stock_once_the_inventory_is_back(outage_server):
    stubs = outage_server.stubs
    stubs.set_stock("SKU-A", 5)
    placed = stubs.place("alice", [("SKU-A", 2)])
    assert wait_for_status(stubs, placed.order_id).status == pb.ORDER_STATUS_VALIDATED
    write_faults(outage_server.faults, inventory_error=True)

    stubs.orders.CancelOrder(pb.CancelOrderRequest(order_id=placed.order_id), timeout=10)
    _outage_outlasts_the_attempts(outage_server, placed.order_id, "ORDER_CANCELLED")
    write_faults(outage_server.faults)

    wait_until(lambda: stock_of(stubs, "SKU-A") == (5, 0), timeout=2, what="the release after the outage")
    summary = wait_settled_and_check(outage_server, {"SKU-A": 5}, timeout=5)
    assert summary.events_by_status == {"DONE": 2}


def test_an_order_placed_during_a_long_outage_is_validated_once_the_inventory_is_back(outage_server):
    stubs = outage_server.stubs
    stubs.set_stock("SKU-A", 5)
    write_faults(outage_server.faults, inventory_error=True)

    placed = stubs.place("bob", [("SKU-A", 2)])
    _outage_outlasts_the_attempts(outage_server, placed.order_id, "ORDER_CREATED")
    write_faults(outage_server.faults)

    order = wait_for_status(stubs, placed.order_id, timeout=5)
    assert (order.status, order.failure_reason) == (pb.ORDER_STATUS_VALIDATED, "")
    wait_settled_and_check(outage_server, {"SKU-A": 5}, timeout=5)
