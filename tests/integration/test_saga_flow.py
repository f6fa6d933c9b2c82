"""The inventory saga over real gRPC, on both backends: reserve, fail with a reason, cancel and
release, WatchOrder until settled, and the client's correlation id in the saga's worker threads."""

from __future__ import annotations

import logging

import grpc
import pytest
from orders_service_api.v1 import orders_pb2 as pb

from server.logs import CorrelationFilter
from tests.integration.helpers import rpc_error
from tests.integration.saga_support import (
    stock_of,
    wait_for_status,
    wait_settled_and_check,
    write_faults,
)
from tests.support import wait_until

# Tests name `database_url` before `server`: fixtures are torn down in reverse order, so the server
# stops before its database is dropped (tests/conftest.py's `server` lists them the other way round).

SLOW_INVENTORY_S = 0.5  # how long each inventory call takes on `slow_server`: the time a test has to act


@pytest.fixture
def slow_server(database_url, start_server, tmp_path):
    """A server whose inventory calls each take SLOW_INVENTORY_S: orders stay PENDING for a while."""
    faults = tmp_path / "faults.json"
    write_faults(faults, inventory_delay_s=SLOW_INVENTORY_S)
    server = start_server(database_url=database_url, fault_file=str(faults))
    server.faults = faults
    return server


def test_an_order_within_stock_is_validated_and_its_stock_reserved(database_url, server):
    server.stubs.set_stock("SKU-A", 10)

    placed = server.stubs.place("alice", [("SKU-A", 3)])
    assert placed.status == pb.ORDER_STATUS_PENDING

    order = wait_for_status(server.stubs, placed.order_id)
    assert order.status == pb.ORDER_STATUS_VALIDATED
    assert order.failure_reason == ""
    assert order.version == 2
    assert stock_of(server.stubs, "SKU-A") == (7, 3)
    wait_settled_and_check(server, {"SKU-A": 10})


def test_an_order_beyond_stock_fails_naming_the_sku_and_reserves_nothing(database_url, server):
    server.stubs.set_stock("SKU-A", 5)
    server.stubs.set_stock("SKU-B", 2)
    before = {sku: server.stubs.stock(sku) for sku in ("SKU-A", "SKU-B")}

    # SKU-A alone could be reserved; all items or none: SKU-B's shortfall leaves SKU-A untouched too.
    placed = server.stubs.place("bob", [("SKU-A", 1), ("SKU-B", 3)])

    order = wait_for_status(server.stubs, placed.order_id)
    assert order.status == pb.ORDER_STATUS_FAILED
    assert "SKU-B" in order.failure_reason
    assert "SKU-A" not in order.failure_reason
    assert {sku: server.stubs.stock(sku) for sku in before} == before  # available, reserved, version
    wait_settled_and_check(server, {"SKU-A": 5, "SKU-B": 2})


def test_an_order_of_an_unknown_sku_fails_naming_it(database_url, server):
    server.stubs.set_stock("SKU-A", 5)

    placed = server.stubs.place("carol", [("SKU-A", 1), ("GHOST-9", 1)])

    order = wait_for_status(server.stubs, placed.order_id)
    assert order.status == pb.ORDER_STATUS_FAILED
    assert "GHOST-9" in order.failure_reason
    assert stock_of(server.stubs, "SKU-A") == (5, 0)
    error = rpc_error(server.stubs.stock, "GHOST-9")
    assert error.code() == grpc.StatusCode.NOT_FOUND  # the saga did not invent the SKU
    wait_settled_and_check(server, {"SKU-A": 5})


def test_cancelling_a_validated_order_releases_its_stock(database_url, server):
    server.stubs.set_stock("SKU-A", 10)
    server.stubs.set_stock("SKU-B", 4)
    placed = server.stubs.place("dave", [("SKU-A", 6), ("SKU-B", 4)])
    validated = wait_for_status(server.stubs, placed.order_id)
    assert validated.status == pb.ORDER_STATUS_VALIDATED
    assert stock_of(server.stubs, "SKU-A") == (4, 6)
    assert stock_of(server.stubs, "SKU-B") == (0, 4)

    cancelled = server.stubs.orders.CancelOrder(
        pb.CancelOrderRequest(order_id=placed.order_id, expected_version=validated.version), timeout=10
    ).order

    assert cancelled.status == pb.ORDER_STATUS_CANCELLED
    wait_until(
        lambda: stock_of(server.stubs, "SKU-A") == (10, 0) and stock_of(server.stubs, "SKU-B") == (4, 0),
        timeout=10,
        what="the cancelled order's stock to come back",
    )
    assert server.stubs.get(placed.order_id).status == pb.ORDER_STATUS_CANCELLED
    # The freed stock can be taken again.
    again = wait_for_status(server.stubs, server.stubs.place("erin", [("SKU-B", 4)]).order_id)
    assert again.status == pb.ORDER_STATUS_VALIDATED
    wait_settled_and_check(server, {"SKU-A": 10, "SKU-B": 4})


def test_watch_order_sends_pending_then_validated_and_ends(slow_server):
    slow_server.stubs.set_stock("SKU-A", 3)
    placed = slow_server.stubs.place("frank", [("SKU-A", 2)])

    stream = slow_server.stubs.orders.WatchOrder(pb.WatchOrderRequest(order_id=placed.order_id), timeout=15)
    seen = list(stream)  # returns only if the server ends the stream (else DEADLINE_EXCEEDED)

    assert [(o.order.status, o.order.version) for o in seen] == [
        (pb.ORDER_STATUS_PENDING, 1),
        (pb.ORDER_STATUS_VALIDATED, 2),
    ]
    assert seen[-1].order.order_id == placed.order_id
    assert stock_of(slow_server.stubs, "SKU-A") == (1, 2)


def test_watch_order_of_a_settled_order_sends_it_once_and_ends(database_url, server):
    server.stubs.set_stock("SKU-A", 1)
    placed = server.stubs.place("gina", [("SKU-A", 1)])
    wait_for_status(server.stubs, placed.order_id)

    seen = list(server.stubs.orders.WatchOrder(pb.WatchOrderRequest(order_id=placed.order_id), timeout=10))

    assert [o.order.status for o in seen] == [pb.ORDER_STATUS_VALIDATED]


def test_watch_order_of_an_unknown_order_is_not_found(database_url, server):
    error = rpc_error(
        server.stubs.orders.WatchOrder,
        pb.WatchOrderRequest(order_id="00000000-0000-4000-8000-000000000000"),
        timeout=10,
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_watch_order_ends_with_cancelled_when_cancelled_while_pending(slow_server):
    slow_server.stubs.set_stock("SKU-A", 5)
    placed = slow_server.stubs.place("hana", [("SKU-A", 2)])
    stream = slow_server.stubs.orders.WatchOrder(pb.WatchOrderRequest(order_id=placed.order_id), timeout=15)
    first = next(stream)
    assert first.order.status == pb.ORDER_STATUS_PENDING
    # The saga has claimed the event and sits in its (slow) reservation: the cancel races it.
    wait_until(lambda: slow_server.service.dispatcher.in_flight >= 1, timeout=5, what="the saga to start")

    cancelled = slow_server.stubs.orders.CancelOrder(
        pb.CancelOrderRequest(order_id=placed.order_id, expected_version=1),
        timeout=10,  # still PENDING
    ).order
    rest = list(stream)

    assert cancelled.status == pb.ORDER_STATUS_CANCELLED
    assert [o.order.status for o in rest] == [pb.ORDER_STATUS_CANCELLED]
    # The saga reserved after the cancel and must give it back (and the cancel's release is a no-op).
    write_faults(slow_server.faults)
    wait_until(lambda: stock_of(slow_server.stubs, "SKU-A") == (5, 0), timeout=10, what="stock to come back")
    assert slow_server.stubs.get(placed.order_id).status == pb.ORDER_STATUS_CANCELLED
    wait_settled_and_check(slow_server, {"SKU-A": 5})


def test_the_clients_correlation_id_is_on_the_saga_steps_log_lines(database_url, server, caplog):
    caplog.set_level(logging.INFO)
    stamp = CorrelationFilter()
    caplog.handler.addFilter(stamp)  # as server.logs.configure() does on the real handler
    try:
        server.stubs.set_stock("SKU-A", 5)
        placed = server.stubs.orders.PlaceOrder(
            pb.PlaceOrderRequest(customer_id="ivan", items=[pb.OrderItem(sku="SKU-A", quantity=2)]),
            metadata=[("x-correlation-id", "checkout-7f3a")],
            timeout=10,
        )
        order_id = placed.order.order_id
        assert wait_for_status(server.stubs, order_id).status == pb.ORDER_STATUS_VALIDATED
        server.stubs.orders.CancelOrder(
            pb.CancelOrderRequest(order_id=order_id),
            metadata=[("x-correlation-id", "cancel-19bc")],
            timeout=10,
        )
        wait_until(lambda: stock_of(server.stubs, "SKU-A") == (5, 0), timeout=10, what="the release")
        # The release is logged just after the stock commit: wait for the line itself too.
        wait_until(
            lambda: any("released" in r.getMessage() for r in caplog.records), timeout=5, what="release log"
        )
    finally:
        caplog.handler.removeFilter(stamp)

    saga_records = [r for r in caplog.records if r.threadName.startswith("saga")]
    reserve_lines = [r for r in saga_records if "stock reserved" in r.getMessage()]
    settle_lines = [r for r in saga_records if f"order {order_id} is VALIDATED" in r.getMessage()]
    release_lines = [r for r in saga_records if "released" in r.getMessage()]
    assert reserve_lines and settle_lines and release_lines, [r.getMessage() for r in saga_records]
    for record in reserve_lines + settle_lines:
        assert record.correlation_id == "checkout-7f3a", record.getMessage()
        assert record.order_id == order_id
    for record in release_lines:
        assert record.correlation_id == "cancel-19bc", record.getMessage()
        assert record.order_id == order_id
    # The request's own access line carries the same id, in a gRPC handler thread.
    rpc_lines = [r for r in caplog.records if r.name == "orders.rpc" and "PlaceOrder" in r.getMessage()]
    assert [r.correlation_id for r in rpc_lines] == ["checkout-7f3a"]
