"""Inventory in a PostgreSQL database of its own: the saga spans two databases with no shared
transaction, and a mixed run of placements and cancels still ends with every invariant holding."""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import func, inspect, select

from db.engine import make_engine
from db.tables import orders, stock, stock_reservations
from tests.integration.saga_support import stock_of, wait_for_status, write_faults
from tests.invariants import check_invariants, settled
from tests.support import wait_until

pytestmark = pytest.mark.postgres


@pytest.fixture
def two_databases(make_pg_database):
    return make_pg_database(), make_pg_database()


def _tables_and_counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        present = set(inspect(engine).get_table_names())
        counts = {}
        with engine.connect() as c:
            for table in (orders, stock, stock_reservations):
                if table.name in present:
                    counts[table.name] = c.execute(select(func.count()).select_from(table)).scalar_one()
        return counts
    finally:
        engine.dispose()


def test_inventory_in_its_own_database_works_end_to_end(two_databases, start_server):
    orders_url, inventory_url = two_databases
    server = start_server(database_url=orders_url, inventory_database_url=inventory_url)
    assert server.service.engines.inventory is not server.service.engines.orders
    server.stubs.set_stock("SKU-A", 5)
    server.stubs.set_stock("SKU-B", 1)

    ok = wait_for_status(server.stubs, server.stubs.place("alice", [("SKU-A", 2)]).order_id)
    short = wait_for_status(server.stubs, server.stubs.place("bob", [("SKU-A", 1), ("SKU-B", 2)]).order_id)

    assert ok.status == pb.ORDER_STATUS_VALIDATED
    assert short.status == pb.ORDER_STATUS_FAILED and "SKU-B" in short.failure_reason
    assert stock_of(server.stubs, "SKU-A") == (3, 2)
    # Orders live only in the orders database, stock and reservations only in the inventory one.
    assert _tables_and_counts(orders_url) == {"orders": 2}
    # One reservation row for alice's order, and bob's two items closed with RELEASED rows, so that
    # no late step of his saga can still reserve for an order that is already FAILED.
    assert _tables_and_counts(inventory_url) == {"stock": 2, "stock_reservations": 3}

    server.stubs.orders.CancelOrder(pb.CancelOrderRequest(order_id=ok.order_id), timeout=10)
    wait_until(lambda: stock_of(server.stubs, "SKU-A") == (5, 0), timeout=10, what="the release")
    wait_until(lambda: settled(orders_url), timeout=10, what="everything to settle")
    check_invariants(orders_url, inventory_url, {"SKU-A": 5, "SKU-B": 1})


SKUS = [f"MIX-{n}" for n in range(10)]


def test_a_mixed_run_over_two_databases_keeps_every_invariant(two_databases, start_server, tmp_path):
    orders_url, inventory_url = two_databases
    faults = tmp_path / "faults.json"
    # Each inventory call takes a little while, so that a cancel right after placing often finds
    # the order still PENDING (the saga's backlog outruns the 8 workers).
    write_faults(faults, inventory_delay_s=0.01)
    server = start_server(
        database_url=orders_url,
        inventory_database_url=inventory_url,
        fault_file=str(faults),
        max_workers=32,
        max_concurrent_rpcs=256,
    )
    stubs = server.stubs
    rng = random.Random(20261125)
    initial = {sku: rng.randint(15, 40) for sku in SKUS}
    for sku, available in initial.items():
        stubs.set_stock(sku, available)
    plans = []
    for i in range(300):
        items = [(sku, rng.randint(1, 3)) for sku in rng.sample(SKUS, rng.randint(1, 3))]
        roll = rng.random()
        action = "cancel-pending" if roll < 0.10 else "cancel-validated" if roll < 0.20 else "keep"
        plans.append((i, items, action))

    def run(plan: tuple[int, list[tuple[str, int]], str]) -> str:
        i, items, action = plan
        placed = stubs.place(f"mixed-{i % 17}", items)
        if action == "keep":
            return "kept"
        if action == "cancel-pending":
            request = pb.CancelOrderRequest(order_id=placed.order_id, expected_version=1)
        else:
            settled_order = wait_for_status(stubs, placed.order_id)
            if settled_order.status != pb.ORDER_STATUS_VALIDATED:
                return "failed-before-cancel"
            request = pb.CancelOrderRequest(order_id=placed.order_id, expected_version=settled_order.version)
        try:
            stubs.orders.CancelOrder(request, timeout=10)
        except grpc.RpcError as error:
            # Only the saga may have moved the order first (version 1 is PENDING, 2 is settled).
            assert action == "cancel-pending" and error.code() == grpc.StatusCode.ABORTED, error
            return "too-late"
        return f"cancelled-{action.removeprefix('cancel-')}"

    with ThreadPoolExecutor(24) as pool:
        outcomes = Counter(pool.map(run, plans))

    assert outcomes["cancelled-pending"] >= 1, outcomes
    assert outcomes["cancelled-validated"] >= 1, outcomes
    wait_until(lambda: settled(orders_url), timeout=25, interval=0.05, what="every order and event to settle")
    summary = check_invariants(orders_url, inventory_url, initial)
    assert (
        summary.orders_by_status["CANCELLED"]
        == outcomes["cancelled-pending"] + outcomes["cancelled-validated"]
    )
    assert summary.orders_by_status["VALIDATED"] > 0 and summary.orders_by_status["FAILED"] > 0, summary
    assert sum(summary.orders_by_status.values()) == 300
    assert set(summary.events_by_status) == {"DONE"}
    assert summary.stock == {sku: stock_of(stubs, sku) for sku in SKUS}
