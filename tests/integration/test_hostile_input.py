"""Hostile input over real gRPC: whatever a client sends, the answer is a status from API.md's table,
never INTERNAL (bar grpcio's own answer to bytes that are not a message), and the server keeps serving.
Nothing a client sends reaches SQL except as a bound parameter: SQL-looking values come back verbatim.

Every test runs on both backends: PostgreSQL refuses some text SQLite stores (NUL), so a fuzz run on
SQLite alone misses the INTERNAL that PostgreSQL gives. `FUZZ_EXAMPLES` (default 25 per property and
backend, for the suite's time budget) is raised by `make fuzz`.
"""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from orders_service_api.v1 import orders_pb2 as pb

from tests.integration.helpers import field_violations, rpc_error

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Codes a request's content may earn (API.md); RESOURCE_EXHAUSTED/UNAVAILABLE are about load, not content.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
}
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
# Any Unicode text protobuf can carry (no lone surrogates), biased towards the edges of the rules.
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=300),
    st.sampled_from(
        [
            "",
            " ",
            "a" * 128,
            "a" * 129,
            "x" * 65,
            "SKU-1",
            "\x00",
            "\x7f",
            "é" * 128,
            "'; DROP TABLE orders; --",
        ]
    ),
)
UUIDISH = st.one_of(TEXT, st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()))
ITEM = st.builds(pb.OrderItem, sku=TEXT, quantity=INT32)
# Valid values too: a hostile field reaches the database only when every other field is valid.
GOOD_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=128)
GOOD_ITEMS = st.lists(
    st.builds(
        pb.OrderItem,
        sku=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
        quantity=st.integers(1, 10_000),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda item: item.sku,
)
CASES = {"count": 0}


def _call(method, request):
    CASES["count"] += 1
    try:
        method(request, timeout=10)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        return error.code(), error.details() or ""


def _assert_clean(code, details):
    assert code in ALLOWED, (code, details)
    assert "Traceback" not in details and "SELECT" not in details and "sqlalchemy" not in details.lower()


@pytest.fixture
def fuzz_server(database_url, start_server):
    """A server on a fresh database of each backend (`database_url` first: the server stops before
    its database is dropped)."""
    server = start_server(database_url=database_url, max_workers=8)
    server.stubs.set_stock("SKU-1", 1_000_000)
    yield server
    # Still healthy after everything it was sent.
    status = (
        health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    )
    assert status == health_pb2.HealthCheckResponse.SERVING
    print(f"\nfuzz cases tried so far: {CASES['count']}")


def test_place_order_with_arbitrary_fields_never_fails_inside(fuzz_server):
    @FUZZ
    @given(
        customer=st.one_of(GOOD_TEXT, TEXT),
        items=st.one_of(GOOD_ITEMS, st.lists(ITEM, max_size=110)),
        request_id=st.one_of(TEXT, GOOD_TEXT),
    )
    def check(customer, items, request_id):
        request = pb.PlaceOrderRequest(customer_id=customer, items=items, request_id=request_id)
        _assert_clean(*_call(fuzz_server.stubs.orders.PlaceOrder, request))

    check()


def test_reads_and_cancels_with_arbitrary_fields_never_fail_inside(fuzz_server):
    orders = fuzz_server.stubs.orders

    @FUZZ
    @given(
        order_id=UUIDISH,
        version=INT64,
        customer=TEXT,
        status=INT32,
        page_size=INT32,
        token=TEXT,
    )
    def check(order_id, version, customer, status, page_size, token):
        _assert_clean(*_call(orders.GetOrder, pb.GetOrderRequest(order_id=order_id)))
        _assert_clean(
            *_call(orders.CancelOrder, pb.CancelOrderRequest(order_id=order_id, expected_version=version))
        )
        listing = pb.ListOrdersRequest(
            customer_id=customer, status=status, page_size=page_size, page_token=token
        )
        _assert_clean(*_call(orders.ListOrders, listing))

    check()


def test_stock_calls_with_arbitrary_fields_never_fail_inside(fuzz_server):
    inventory = fuzz_server.stubs.inventory

    @FUZZ
    @given(sku=TEXT, available=INT64)
    def check(sku, available):
        _assert_clean(*_call(inventory.SetStock, pb.SetStockRequest(sku=sku, available=available)))
        _assert_clean(*_call(inventory.GetStock, pb.GetStockRequest(sku=sku)))

    check()


@pytest.mark.parametrize(
    "method",
    [
        "/orders.v1.OrderService/PlaceOrder",
        "/orders.v1.OrderService/GetOrder",
        "/orders.v1.OrderService/ListOrders",
        "/orders.v1.OrderService/CancelOrder",
        "/orders.v1.InventoryService/SetStock",
        "/orders.v1.InventoryService/GetStock",
    ],
)
def test_raw_bytes_get_a_status_and_never_stop_the_server(fuzz_server, method):
    call = fuzz_server.channel.unary_unary(method, request_serializer=None, response_deserializer=None)

    @FUZZ
    @given(body=st.binary(max_size=512))
    def check(body):
        code, details = _call(call, body)
        if code == grpc.StatusCode.INTERNAL:
            assert details == "Exception deserializing request!"
        else:
            _assert_clean(code, details)

    check()


def test_watch_with_arbitrary_ids_ends_with_a_clean_status(fuzz_server):
    @FUZZ
    @given(order_id=UUIDISH)
    def check(order_id):
        CASES["count"] += 1
        try:
            list(fuzz_server.stubs.orders.WatchOrder(pb.WatchOrderRequest(order_id=order_id), timeout=10))
        except grpc.RpcError as error:
            _assert_clean(error.code(), error.details() or "")

    check()


def test_sql_looking_values_are_stored_and_returned_verbatim(fuzz_server):
    hostile = "'; DROP TABLE orders; -- \" OR 1=1 /* é 🚀"
    placed = fuzz_server.stubs.place(hostile, [("SKU-1", 1)], request_id=hostile)
    assert placed.customer_id == hostile
    listed = fuzz_server.stubs.orders.ListOrders(pb.ListOrdersRequest(customer_id=hostile), timeout=10).orders
    assert [o.order_id for o in listed] == [placed.order_id]
    assert fuzz_server.stubs.place(hostile, [("SKU-1", 1)], request_id=hostile).order_id == placed.order_id


def test_a_request_with_a_hundred_bad_items_still_gets_invalid_argument_with_bounded_details(fuzz_server):
    long_bad_sku = "!" * 200
    request = pb.PlaceOrderRequest(
        customer_id="\x00" * 128,
        items=[pb.OrderItem(sku=long_bad_sku, quantity=-1)] * 100,
        request_id="r" * 129,
    )
    with pytest.raises(grpc.RpcError) as rejected:
        fuzz_server.stubs.orders.PlaceOrder(request, timeout=10)
    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more (see the BadRequest details)" in rejected.value.details()


# C0 controls and DEL: PostgreSQL refuses NUL in text; the rest are refused alike so that what a
# client may store does not depend on the backend (API.md: "no control characters").
CONTROL = ["\x00", "\x01", "\t", "\n", "\x1b", "\x1f", "\x7f"]
VALID_ID = "3f2b8c1e-9a4d-4e7b-8c2f-1a2b3c4d5e6f"


def _string_fields(bad: str) -> list[tuple[str, str, object, str]]:
    """(method, the field, a request whose one bad field holds `bad`, its field violation's path)."""
    item = pb.OrderItem(sku="SKU-1", quantity=1)
    return [
        (
            "PlaceOrder",
            "customer_id",
            pb.PlaceOrderRequest(customer_id=f"c{bad}1", items=[item]),
            "customer_id",
        ),
        (
            "PlaceOrder",
            "request_id",
            pb.PlaceOrderRequest(customer_id="c1", items=[item], request_id=f"r{bad}1"),
            "request_id",
        ),
        (
            "PlaceOrder",
            "sku",
            pb.PlaceOrderRequest(customer_id="c1", items=[pb.OrderItem(sku=f"S{bad}1", quantity=1)]),
            "items[0].sku",
        ),
        ("GetOrder", "order_id", pb.GetOrderRequest(order_id=VALID_ID[:-1] + bad), "order_id"),
        ("CancelOrder", "order_id", pb.CancelOrderRequest(order_id=bad + VALID_ID), "order_id"),
        ("WatchOrder", "order_id", pb.WatchOrderRequest(order_id=VALID_ID + bad), "order_id"),
        ("ListOrders", "customer_id", pb.ListOrdersRequest(customer_id=f"c{bad}1"), "customer_id"),
        ("ListOrders", "page_token", pb.ListOrdersRequest(page_token=f"bm90{bad}"), "page_token"),
        ("SetStock", "sku", pb.SetStockRequest(sku=f"S{bad}1", available=1), "sku"),
        ("GetStock", "sku", pb.GetStockRequest(sku=f"S{bad}1"), "sku"),
    ]


@pytest.mark.parametrize("bad", CONTROL, ids=lambda c: f"U+{ord(c):04X}")
def test_a_control_character_in_any_string_field_is_invalid_argument_naming_the_field(fuzz_server, bad):
    for name, field, request, path in _string_fields(bad):
        stub = fuzz_server.stubs.inventory if name in ("SetStock", "GetStock") else fuzz_server.stubs.orders
        error = rpc_error(getattr(stub, name), request, timeout=10)

        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, field, error.details())
        assert path in field_violations(error), (name, field, field_violations(error))
