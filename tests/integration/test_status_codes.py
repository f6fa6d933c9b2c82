"""Every row of API.md's status table, over real gRPC against a real database.

Every failed call goes through `rpc_error`, which also checks that no message shows SQL or a trace.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from db.orders import OrderRepository
from tests.conftest import PG_ADMIN_URL
from tests.integration.helpers import (
    field_violations,
    health_status,
    pg_connect,
    place_request,
    rows_of,
    rpc_error,
)
from tests.support import wait_until

UNKNOWN_ID = "0b7e3d2a-5c1f-4e8a-9d6b-3f2a1c0e9b87"


def bad_requests() -> list[tuple[str, str, object, set[str]]]:
    """(what is wrong, method, request, the fields the violations must name)."""
    one = [pb.OrderItem(sku="SKU-1", quantity=1)]
    return [
        ("no customer", "PlaceOrder", place_request(""), {"customer_id"}),
        ("customer over 128 characters", "PlaceOrder", place_request("é" * 129), {"customer_id"}),
        ("customer with a control character", "PlaceOrder", place_request("bad\x07id"), {"customer_id"}),
        ("customer with DEL", "PlaceOrder", place_request("bad\x7fid"), {"customer_id"}),
        ("no items", "PlaceOrder", place_request("c1", []), {"items"}),
        ("101 items", "PlaceOrder", place_request("c1", [(f"S{i}", 1) for i in range(101)]), {"items"}),
        ("quantity 0", "PlaceOrder", place_request("c1", [("SKU-1", 0)]), {"items[0].quantity"}),
        (
            "negative quantity",
            "PlaceOrder",
            place_request("c1", [("A", 1), ("B", -3)]),
            {"items[1].quantity"},
        ),
        (
            "quantity over 10,000",
            "PlaceOrder",
            place_request("c1", [("SKU-1", 10_001)]),
            {"items[0].quantity"},
        ),
        ("empty SKU", "PlaceOrder", place_request("c1", [("", 1)]), {"items[0].sku"}),
        ("SKU with a space", "PlaceOrder", place_request("c1", [("SKU 1", 1)]), {"items[0].sku"}),
        ("SKU over 64 characters", "PlaceOrder", place_request("c1", [("S" * 65, 1)]), {"items[0].sku"}),
        ("the same SKU twice", "PlaceOrder", place_request("c1", [("A", 1), ("A", 2)]), {"items[1].sku"}),
        ("request_id over 128", "PlaceOrder", place_request(request_id="r" * 129), {"request_id"}),
        (
            "every rule at once",
            "PlaceOrder",
            pb.PlaceOrderRequest(customer_id="", items=[]),
            {"customer_id", "items"},
        ),
        ("no order id", "GetOrder", pb.GetOrderRequest(order_id=""), {"order_id"}),
        ("malformed order id", "GetOrder", pb.GetOrderRequest(order_id="not-a-uuid"), {"order_id"}),
        ("unhyphenated order id", "GetOrder", pb.GetOrderRequest(order_id=uuid.uuid4().hex), {"order_id"}),
        ("malformed id to cancel", "CancelOrder", pb.CancelOrderRequest(order_id="42"), {"order_id"}),
        (
            "negative expected_version",
            "CancelOrder",
            pb.CancelOrderRequest(order_id=UNKNOWN_ID, expected_version=-1),
            {"expected_version"},
        ),
        ("malformed id to watch", "WatchOrder", pb.WatchOrderRequest(order_id="x"), {"order_id"}),
        ("negative page_size", "ListOrders", pb.ListOrdersRequest(page_size=-1), {"page_size"}),
        ("unknown status enum", "ListOrders", pb.ListOrdersRequest(status=99), {"status"}),  # type: ignore[arg-type]
        (
            "customer filter over 128",
            "ListOrders",
            pb.ListOrdersRequest(customer_id="c" * 129),
            {"customer_id"},
        ),
        (
            "page_token never issued",
            "ListOrders",
            pb.ListOrdersRequest(page_token="bm90LWEtdG9rZW4"),
            {"page_token"},
        ),
        ("stock of an empty SKU", "SetStock", pb.SetStockRequest(sku="", available=1), {"sku"}),
        ("negative stock", "SetStock", pb.SetStockRequest(sku="SKU-1", available=-1), {"available"}),
        ("stock of a malformed SKU", "GetStock", pb.GetStockRequest(sku="no/slashes"), {"sku"}),
        (
            "one valid item does not hide a bad one",
            "PlaceOrder",
            pb.PlaceOrderRequest(customer_id="c1", items=[*one, pb.OrderItem(sku="B", quantity=0)]),
            {"items[1].quantity"},
        ),
    ]


def method(server, name: str):
    stub = server.stubs.inventory if name in ("SetStock", "GetStock") else server.stubs.orders
    return getattr(stub, name)


def test_bad_fields_are_invalid_argument_with_bad_request_field_violations(quiet_server):
    for what, name, request, fields in bad_requests():
        error = rpc_error(method(quiet_server, name), request, timeout=10)

        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        violations = field_violations(error)
        assert set(violations) == fields, what
        assert all(violations.values()), f"{what}: every violation says what is wrong"

    assert rows_of(quiet_server).totals() == (0, 0, 0)


def test_the_largest_valid_values_are_accepted_and_returned_exactly(quiet_server):
    customer = "😀" * 128  # 128 code points, 512 bytes of UTF-8
    items = [(f"{i:03d}" + "s" * 61, 10_000) for i in range(100)]

    placed = quiet_server.stubs.place(customer, items, request_id="r" * 128)

    assert placed.customer_id == customer
    assert [(i.sku, i.quantity) for i in placed.items] == items
    assert quiet_server.stubs.get(placed.order_id) == placed
    listed = quiet_server.stubs.orders.ListOrders(pb.ListOrdersRequest(customer_id=customer), timeout=10)
    assert [o.order_id for o in listed.orders] == [placed.order_id]


def test_an_unknown_order_or_sku_is_not_found_and_a_known_id_is_found_in_any_case(quiet_server):
    placed = quiet_server.stubs.place()
    assert quiet_server.stubs.get(placed.order_id.upper()) == placed

    for name, request in (
        ("GetOrder", pb.GetOrderRequest(order_id=UNKNOWN_ID)),
        ("CancelOrder", pb.CancelOrderRequest(order_id=UNKNOWN_ID)),
        ("WatchOrder", pb.WatchOrderRequest(order_id=UNKNOWN_ID)),
        ("GetStock", pb.GetStockRequest(sku="NEVER-STOCKED")),
    ):
        error = rpc_error(method(quiet_server, name), request, timeout=10)
        assert error.code() == grpc.StatusCode.NOT_FOUND, name


def test_version_mismatch_is_aborted_and_a_settled_order_or_reused_key_is_a_failed_precondition(quiet_server):
    placed = quiet_server.stubs.place("alice", request_id="key-1")
    orders = quiet_server.stubs.orders

    stale = rpc_error(
        orders.CancelOrder, pb.CancelOrderRequest(order_id=placed.order_id, expected_version=5), timeout=10
    )
    orders.CancelOrder(pb.CancelOrderRequest(order_id=placed.order_id), timeout=10)
    again = rpc_error(orders.CancelOrder, pb.CancelOrderRequest(order_id=placed.order_id), timeout=10)
    reused = rpc_error(orders.PlaceOrder, place_request("bob", request_id="key-1"), timeout=10)

    assert stale.code() == grpc.StatusCode.ABORTED
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reused.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_message_over_the_receive_limit_is_resource_exhausted(database_url, start_server):
    server = start_server(database_url=database_url, max_receive_message_bytes=1024, saga_workers=0)

    too_big = rpc_error(server.stubs.orders.PlaceOrder, place_request("c" * 2000), timeout=10)
    # Under the limit the same field reaches validation and gets the usual answer.
    too_long = rpc_error(server.stubs.orders.PlaceOrder, place_request("c" * 200), timeout=10)

    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rows_of(server).totals() == (0, 0, 0)
    assert server.stubs.place("c1").status == pb.ORDER_STATUS_PENDING


def test_unary_calls_past_the_concurrency_limit_are_refused_counted_and_logged_but_streams_do_not_count(
    backend, database_url, start_server, caplog
):
    server = start_server(database_url=database_url, max_concurrent_rpcs=2, saga_workers=0)
    first, second = server.stubs.place("a"), server.stubs.place("b")
    admission = server.service.admission
    # Open streams, more than the limit, hold none of its places.
    streams = [
        server.stubs.orders.WatchOrder(pb.WatchOrderRequest(order_id=o.order_id), timeout=30)
        for o in (first, second, first, second)
    ]
    refused_log = "orders.admission"
    try:
        assert [next(stream).order.order_id for stream in streams] == [first.order_id, second.order_id] * 2
        assert server.stubs.get(first.order_id) == first

        with ThreadPoolExecutor(2) as clients, row_locked(backend, database_url, first.order_id):
            cancel = pb.CancelOrderRequest(order_id=first.order_id)
            held = [clients.submit(server.stubs.orders.CancelOrder, cancel, timeout=20) for _ in range(2)]
            wait_until(lambda: admission.calls_in_flight == 2, what="two calls holding the limit's places")
            caplog.set_level(logging.WARNING, logger=refused_log)

            refused = [
                rpc_error(
                    server.stubs.orders.GetOrder, pb.GetOrderRequest(order_id=second.order_id), timeout=5
                )
                for _ in range(5)
            ]
            refused_probe = rpc_error(health_status, server)

            assert [error.code() for error in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
            assert refused_probe.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # probes are calls too
        assert {call.result().order.status for call in held if call.exception() is None} == {
            pb.ORDER_STATUS_CANCELLED
        }
    finally:
        for stream in streams:
            stream.cancel()

    metrics = server.service.metrics.registry
    refusals = {
        method: metrics.get_sample_value(
            "orders_rpc_rejected_total", {"method": method, "reason": "concurrency"}
        )
        for method in ("/orders.v1.OrderService/GetOrder", "/grpc.health.v1.Health/Check")
    }
    assert refusals == {"/orders.v1.OrderService/GetOrder": 5, "/grpc.health.v1.Health/Check": 1}
    # One line at the first refusal, the other five are told together once the interval is over.
    lines = [r.getMessage() for r in caplog.records if r.name == refused_log]
    assert len(lines) == 1 and lines[0].startswith("refused 1 call at admission"), lines
    admission.refusals.flush()
    lines = [r.getMessage() for r in caplog.records if r.name == refused_log]
    assert len(lines) == 2 and lines[1].startswith("refused 5 calls at admission in the last"), lines
    assert "concurrency: 5" in lines[1]
    wait_until(lambda: server.stubs.get(second.order_id) == second, what="calls served again")
    assert health_status(server) == "SERVING"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_database_is_unavailable_at_once_not_internal(start_server):
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{closed_port()}/orders"
    server = start_server(database_url=url, migrate_on_start="never", saga_workers=0)

    for name, request in (
        ("GetOrder", pb.GetOrderRequest(order_id=UNKNOWN_ID)),
        ("PlaceOrder", place_request()),
        ("ListOrders", pb.ListOrdersRequest()),
        ("CancelOrder", pb.CancelOrderRequest(order_id=UNKNOWN_ID)),
        ("GetStock", pb.GetStockRequest(sku="SKU-1")),
    ):
        started = time.monotonic()
        error = rpc_error(method(server, name), request, timeout=10)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, name
        assert time.monotonic() - started < 2, name

    assert health_status(server) == "NOT_SERVING"


@pytest.mark.postgres
def test_a_database_outage_is_unavailable_and_the_service_recovers_after_it(make_pg_database, start_server):
    url = make_pg_database()
    server = start_server(database_url=url, saga_workers=0)
    placed = server.stubs.place()
    name = make_url(url).database
    admin = pg_connect(PG_ADMIN_URL, autocommit=True)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )

        started = time.monotonic()
        error = rpc_error(
            server.stubs.orders.GetOrder, pb.GetOrderRequest(order_id=placed.order_id), timeout=10
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2
        assert rpc_error(server.stubs.orders.PlaceOrder, place_request(), timeout=10).code() == (
            grpc.StatusCode.UNAVAILABLE
        )
        wait_until(lambda: health_status(server) == "NOT_SERVING", what="health to report the outage")

        with admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        admin.close()

    wait_until(lambda: health_status(server) == "SERVING", what="health to report the recovery")
    assert server.stubs.get(placed.order_id) == placed


@contextmanager
def row_locked(backend: str, url: str, order_id: str) -> Iterator[int | None]:
    """Another client holds the order's row (PostgreSQL) or the write lock (SQLite) until the block ends;
    yields the PostgreSQL backend pid of that client."""
    if backend == "postgres":
        holder = pg_connect(url)
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
            cursor.execute("SELECT id FROM orders WHERE id = %s FOR UPDATE", (order_id,))
        try:
            yield pid
        finally:
            holder.rollback()
            holder.close()
    else:
        path = make_url(url).database
        assert path is not None
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield None
        finally:
            holder.execute("ROLLBACK")
            holder.close()


def server_queries_on_orders(url: str, holder_pid: int) -> list[str]:
    """Statements of other sessions on this database that touch `orders` and are running or waiting."""
    monitor = pg_connect(url, autocommit=True)
    try:
        with monitor.cursor() as cursor:
            cursor.execute(
                """
                SELECT query FROM pg_stat_activity
                WHERE datname = current_database() AND pid NOT IN (pg_backend_pid(), %s)
                  AND (wait_event_type = 'Lock' OR (state = 'active' AND query ILIKE '%%orders%%'
                       AND query NOT ILIKE '%%alembic_version%%'))
                """,
                (holder_pid,),
            )
            return [row[0] for row in cursor.fetchall()]
    finally:
        monitor.close()


def test_a_call_whose_deadline_passes_on_a_locked_row_is_deadline_exceeded_and_abandoned(
    backend, database_url, start_server, caplog
):
    caplog.set_level(logging.INFO, logger="orders.rpc")
    server = start_server(database_url=database_url, saga_workers=0)
    placed = server.stubs.place()
    request = pb.CancelOrderRequest(order_id=placed.order_id)

    with row_locked(backend, database_url, placed.order_id) as holder_pid:
        started = time.monotonic()
        error = rpc_error(server.stubs.orders.CancelOrder, request, timeout=0.5)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5

        # While the lock is still held, the server gives up its own work too.
        wait_until(
            lambda: any("CancelOrder code=DEADLINE_EXCEEDED" in r.getMessage() for r in caplog.records),
            timeout=3,
            what="the server to abandon the call",
        )
        if holder_pid is not None:
            wait_until(
                lambda: server_queries_on_orders(database_url, holder_pid) == [],
                timeout=3,
                what="no query of the abandoned call left in pg_stat_activity",
            )

    # The lock is free again: nothing of the abandoned call may complete now.
    assert server.stubs.get(placed.order_id) == placed
    assert rows_of(server).events(placed.order_id, "ORDER_CANCELLED") == []
    assert server.stubs.orders.CancelOrder(request, timeout=10).order.version == 2


def test_bytes_that_are_not_a_protobuf_message_get_internal_and_the_server_keeps_serving(quiet_server):
    garbage = b"\xff\xff\xff\xff\xff"
    calls = [
        quiet_server.channel.unary_unary(f"/orders.v1.OrderService/{name}")
        for name in ("PlaceOrder", "GetOrder", "CancelOrder", "ListOrders")
    ]
    calls.append(quiet_server.channel.unary_unary("/orders.v1.InventoryService/SetStock"))
    calls.append(quiet_server.channel.unary_stream("/orders.v1.OrderService/WatchOrder"))

    for call in calls:
        error = rpc_error(call, garbage, timeout=10)
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == "Exception deserializing request!"

    placed = quiet_server.stubs.place()
    assert quiet_server.stubs.get(placed.order_id) == placed
    assert rows_of(quiet_server).totals() == (1, 1, 1)


def test_an_unexpected_error_is_internal_and_names_only_the_correlation_id(quiet_server, monkeypatch):
    placed = quiet_server.stubs.place()

    def broken_get(self, order_id):
        raise sa_exc.ProgrammingError(
            "SELECT orders.id FROM ordrs WHERE orders.id = %(id)s",
            {"id": order_id},
            Exception('relation "ordrs" does not exist'),
        )

    monkeypatch.setattr(OrderRepository, "get", broken_get)
    error = rpc_error(
        quiet_server.stubs.orders.GetOrder,
        pb.GetOrderRequest(order_id=placed.order_id),
        metadata=[("x-correlation-id", "trace-me-1")],
        timeout=10,
    )
    monkeypatch.undo()

    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error (correlation id trace-me-1)"
    assert dict(error.initial_metadata())["x-correlation-id"] == "trace-me-1"
    assert quiet_server.stubs.get(placed.order_id) == placed


def test_a_stopped_server_is_unavailable(database_url, start_server):
    server = start_server(database_url=database_url, saga_workers=0)
    placed = server.stubs.place()

    server.service.stop(grace=0.5)

    error = rpc_error(server.stubs.orders.GetOrder, pb.GetOrderRequest(order_id=placed.order_id), timeout=5)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
