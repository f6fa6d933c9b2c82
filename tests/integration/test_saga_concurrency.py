"""Many clients at once against limited stock: never oversold, every order settled, invariants hold."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from orders_service_api.v1 import orders_pb2 as pb

from tests.integration.saga_support import stock_of, wait_settled_and_check

CLIENT_THREADS = 32


@pytest.fixture
def busy_server(make_pg_database, start_server):
    """A PostgreSQL server with room for every client thread (no RESOURCE_EXHAUSTED by design)."""
    return start_server(database_url=make_pg_database(), max_workers=CLIENT_THREADS, max_concurrent_rpcs=256)


@pytest.mark.postgres
def test_200_concurrent_orders_for_50_units_validate_exactly_50(busy_server):
    stubs = busy_server.stubs
    stubs.set_stock("HOT-1", 50)

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        placed = list(pool.map(lambda i: stubs.place(f"customer-{i}", [("HOT-1", 1)]), range(200)))

    assert len({o.order_id for o in placed}) == 200
    summary = wait_settled_and_check(busy_server, {"HOT-1": 50}, timeout=25)
    assert summary.orders_by_status == Counter({"VALIDATED": 50, "FAILED": 150})
    assert summary.events_by_status == Counter({"DONE": 200})
    assert stock_of(stubs, "HOT-1") == (0, 50)
    with ThreadPoolExecutor(8) as pool:
        final = list(pool.map(lambda o: stubs.get(o.order_id), placed))
    statuses = Counter(o.status for o in final)
    assert statuses == Counter({pb.ORDER_STATUS_VALIDATED: 50, pb.ORDER_STATUS_FAILED: 150})
    assert all("HOT-1" in o.failure_reason for o in final if o.status == pb.ORDER_STATUS_FAILED)
    stats = busy_server.service.dispatcher.stats
    print(f"\n200-way race: {stats.batched} of {stats.claimed} events answered in batches (the rest alone)")
    assert stats.batched > 0, "32 callers against 8 workers: claims find several events, set-based"


@pytest.mark.postgres
def test_concurrent_two_sku_orders_reserve_both_items_or_neither(busy_server):
    """Half the orders list the SKUs the other way round: no deadlock, no half reservation."""
    stubs = busy_server.stubs
    stubs.set_stock("PAIR-A", 30)
    stubs.set_stock("PAIR-B", 45)

    def place(i: int) -> pb.Order:
        items = [("PAIR-A", 1), ("PAIR-B", 1)] if i % 2 else [("PAIR-B", 1), ("PAIR-A", 1)]
        return stubs.place(f"pair-{i}", items)

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(place, range(100)))

    summary = wait_settled_and_check(busy_server, {"PAIR-A": 30, "PAIR-B": 45}, timeout=25)
    assert summary.orders_by_status == Counter({"VALIDATED": 30, "FAILED": 70})
    assert stock_of(stubs, "PAIR-A") == (0, 30)
    assert stock_of(stubs, "PAIR-B") == (15, 30)  # the 70 failed orders took nothing of PAIR-B


def test_concurrent_orders_on_sqlite_never_oversell(sqlite_url, start_server):
    """The embedded backend: one writer at a time, the same outcome."""
    server = start_server(database_url=sqlite_url, max_workers=16, max_concurrent_rpcs=128)
    stubs = server.stubs
    stubs.set_stock("HOT-1", 20)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: stubs.place(f"customer-{i}", [("HOT-1", 1)]), range(60)))

    summary = wait_settled_and_check(server, {"HOT-1": 20}, timeout=25)
    assert summary.orders_by_status == Counter({"VALIDATED": 20, "FAILED": 40})
    assert stock_of(stubs, "HOT-1") == (0, 20)
