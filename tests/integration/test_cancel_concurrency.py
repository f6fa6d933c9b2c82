"""CancelOrder under optimistic locking: one winner, one version bump, one ORDER_CANCELLED event."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from orders_service_api.v1 import orders_pb2 as pb

from tests.integration.helpers import field_violations, rows_of, rpc_error
from tests.support import wait_until

RACERS = 16


def cancel_request(order_id: str, expected_version: int = 0) -> pb.CancelOrderRequest:
    return pb.CancelOrderRequest(order_id=order_id, expected_version=expected_version)


def race_cancels(server, order_id: str, expected_version: int = 0) -> list[str]:
    """RACERS concurrent CancelOrder calls released together; the status code name of each."""
    start = threading.Barrier(RACERS)

    def cancel(_: int) -> str:
        start.wait(timeout=10)
        try:
            server.stubs.orders.CancelOrder(cancel_request(order_id, expected_version), timeout=20)
        except grpc.RpcError as error:
            return error.code().name
        return "OK"

    with ThreadPoolExecutor(RACERS) as pool:
        return list(pool.map(cancel, range(RACERS)))


def test_concurrent_cancels_of_one_order_succeed_exactly_once(quiet_server):
    placed = quiet_server.stubs.place("alice")

    codes = race_cancels(quiet_server, placed.order_id)

    assert codes.count("OK") == 1, codes
    assert set(codes) - {"OK"} <= {"FAILED_PRECONDITION", "ABORTED"}, codes
    order = quiet_server.stubs.get(placed.order_id)
    assert (order.status, order.version) == (pb.ORDER_STATUS_CANCELLED, 2)
    assert len(rows_of(quiet_server).events(placed.order_id, "ORDER_CANCELLED")) == 1


def test_concurrent_cancels_expecting_the_same_version_succeed_once_and_abort_the_rest(quiet_server):
    placed = quiet_server.stubs.place("alice")

    codes = race_cancels(quiet_server, placed.order_id, expected_version=1)

    assert sorted(codes) == ["ABORTED"] * (RACERS - 1) + ["OK"]
    assert quiet_server.stubs.get(placed.order_id).version == 2
    assert len(rows_of(quiet_server).events(placed.order_id, "ORDER_CANCELLED")) == 1


def test_a_cancel_with_the_current_version_succeeds_and_returns_the_next_version(quiet_server):
    placed = quiet_server.stubs.place("alice")

    cancelled = quiet_server.stubs.orders.CancelOrder(cancel_request(placed.order_id, 1), timeout=10).order

    assert (cancelled.status, cancelled.version) == (pb.ORDER_STATUS_CANCELLED, 2)
    assert cancelled.update_time.ToDatetime() >= placed.update_time.ToDatetime()
    assert quiet_server.stubs.get(placed.order_id) == cancelled


def test_a_stale_expected_version_is_aborted_and_changes_nothing(quiet_server):
    placed = quiet_server.stubs.place("alice")

    for stale in (2, 7):
        error = rpc_error(
            quiet_server.stubs.orders.CancelOrder, cancel_request(placed.order_id, stale), timeout=10
        )
        assert error.code() == grpc.StatusCode.ABORTED

    assert quiet_server.stubs.get(placed.order_id) == placed
    assert rows_of(quiet_server).events(placed.order_id, "ORDER_CANCELLED") == []


def test_a_negative_expected_version_is_an_invalid_argument(quiet_server):
    placed = quiet_server.stubs.place("alice")

    error = rpc_error(quiet_server.stubs.orders.CancelOrder, cancel_request(placed.order_id, -1), timeout=10)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected_version" in field_violations(error)
    assert quiet_server.stubs.get(placed.order_id) == placed


def test_cancelling_a_cancelled_order_again_is_a_failed_precondition(quiet_server):
    placed = quiet_server.stubs.place("alice")
    quiet_server.stubs.orders.CancelOrder(cancel_request(placed.order_id), timeout=10)

    error = rpc_error(quiet_server.stubs.orders.CancelOrder, cancel_request(placed.order_id), timeout=10)

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert quiet_server.stubs.get(placed.order_id).version == 2
    assert len(rows_of(quiet_server).events(placed.order_id, "ORDER_CANCELLED")) == 1


def test_an_order_the_saga_failed_cannot_be_cancelled(server):
    placed = server.stubs.place("alice", [("NO-SUCH-SKU", 1)])
    failed = wait_until(
        lambda: (order := server.stubs.get(placed.order_id)).status == pb.ORDER_STATUS_FAILED and order,
        what="the saga to fail the order",
    )
    assert "NO-SUCH-SKU" in failed.failure_reason

    error = rpc_error(server.stubs.orders.CancelOrder, cancel_request(placed.order_id), timeout=10)

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert server.stubs.get(placed.order_id) == failed
    assert rows_of(server).events(placed.order_id, "ORDER_CANCELLED") == []


def test_cancelling_a_validated_order_releases_its_stock(server):
    server.stubs.set_stock("WIDGET", 5)
    placed = server.stubs.place("alice", [("WIDGET", 3)])
    wait_until(
        lambda: server.stubs.get(placed.order_id).status == pb.ORDER_STATUS_VALIDATED, what="VALIDATED"
    )
    assert (server.stubs.stock("WIDGET").available, server.stubs.stock("WIDGET").reserved) == (2, 3)

    cancelled = server.stubs.orders.CancelOrder(cancel_request(placed.order_id), timeout=10).order

    assert (cancelled.status, cancelled.version) == (pb.ORDER_STATUS_CANCELLED, 3)
    wait_until(
        lambda: (lambda s: (s.available, s.reserved) == (5, 0))(server.stubs.stock("WIDGET")),
        what="the reservation to be released",
    )
