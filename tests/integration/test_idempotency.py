"""request_id is PlaceOrder's idempotency key (AIP-155): one key, one order, whatever the retries."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from db.tables import orders
from tests.integration.helpers import place_request, rows_of, rpc_error

RACERS = 16


def test_a_retry_with_the_same_request_id_and_payload_returns_the_first_order_and_writes_nothing(
    quiet_server,
):
    request = place_request("alice", [("SKU-1", 2), ("SKU-2", 1)], request_id="checkout-7")
    first = quiet_server.stubs.orders.PlaceOrder(request, timeout=10).order
    rows = rows_of(quiet_server)
    written = rows.totals()

    again = quiet_server.stubs.orders.PlaceOrder(request, timeout=10).order

    assert again == first
    assert rows.totals() == written == (1, 2, 1)


def test_the_same_items_in_another_order_count_as_the_same_payload(quiet_server):
    first = quiet_server.stubs.place("alice", [("SKU-1", 2), ("SKU-2", 1)], request_id="checkout-8")

    again = quiet_server.stubs.place("alice", [("SKU-2", 1), ("SKU-1", 2)], request_id="checkout-8")

    assert again.order_id == first.order_id
    assert rows_of(quiet_server).totals() == (1, 2, 1)


def test_a_request_id_reused_with_another_payload_is_a_failed_precondition(quiet_server):
    first = quiet_server.stubs.place("alice", [("SKU-1", 2)], request_id="checkout-9")
    rows = rows_of(quiet_server)

    for other in (
        place_request("alice", [("SKU-1", 3)], request_id="checkout-9"),
        place_request("alice", [("SKU-2", 2)], request_id="checkout-9"),
        place_request("bob", [("SKU-1", 2)], request_id="checkout-9"),
        place_request("alice", [("SKU-1", 2), ("SKU-2", 1)], request_id="checkout-9"),
    ):
        error = rpc_error(quiet_server.stubs.orders.PlaceOrder, other, timeout=10)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, other
        assert "checkout-9" in error.details()

    assert rows.totals() == (1, 1, 1)
    assert quiet_server.stubs.get(first.order_id) == first


def test_request_ids_are_case_sensitive_and_distinct_keys_make_distinct_orders(quiet_server):
    lower = quiet_server.stubs.place("alice", request_id="key-a")
    upper = quiet_server.stubs.place("alice", request_id="KEY-A")
    unkeyed_1 = quiet_server.stubs.place("alice")
    unkeyed_2 = quiet_server.stubs.place("alice")

    assert len({lower.order_id, upper.order_id, unkeyed_1.order_id, unkeyed_2.order_id}) == 4
    assert rows_of(quiet_server).count(orders) == 4


def test_racing_calls_with_one_request_id_create_exactly_one_order(quiet_server):
    request = place_request("alice", [("SKU-1", 1), ("SKU-2", 4)], request_id="double-click")
    start = threading.Barrier(RACERS)

    def place(_: int) -> str:
        start.wait(timeout=10)
        return quiet_server.stubs.orders.PlaceOrder(request, timeout=20).order.order_id

    with ThreadPoolExecutor(RACERS) as pool:
        order_ids = list(pool.map(place, range(RACERS)))

    assert len(set(order_ids)) == 1
    rows = rows_of(quiet_server)
    assert rows.totals() == (1, 2, 1)
    assert rows.count(orders, request_id="double-click") == 1
    assert len(rows.events(order_ids[0], "ORDER_CREATED")) == 1


def test_racing_calls_with_one_request_id_and_different_payloads_keep_only_the_winner(quiet_server):
    start = threading.Barrier(RACERS)

    def place(n: int) -> tuple[str, str | None]:
        start.wait(timeout=10)
        request = place_request("alice", [("SKU-1", n + 1)], request_id="contested")
        try:
            return "OK", quiet_server.stubs.orders.PlaceOrder(request, timeout=20).order.order_id
        except grpc.RpcError as error:
            return error.code().name, None

    with ThreadPoolExecutor(RACERS) as pool:
        outcomes = list(pool.map(place, range(RACERS)))

    assert sorted(code for code, _ in outcomes) == ["FAILED_PRECONDITION"] * (RACERS - 1) + ["OK"]
    assert rows_of(quiet_server).totals() == (1, 1, 1)
