"""The benchmark's bare stack (bench/bare_stack.py): its own process, PlaceOrder as one INSERT and COMMIT."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import grpc
import pytest
from orders_service_api.v1 import orders_pb2 as pb
from orders_service_api.v1 import orders_pb2_grpc as pb_grpc

from bench.bare_stack import TABLE
from bench.server import BareStackServer
from tests.local_services import pg_connect

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]


def test_the_bare_stack_answers_place_order_with_the_row_it_committed(make_pg_database, tmp_path: Path):
    url = make_pg_database()
    server = BareStackServer(url, tmp_path, "test")
    try:
        with grpc.insecure_channel(server.address) as channel:
            request = pb.PlaceOrderRequest(
                customer_id="bench-1", items=[pb.OrderItem(sku="SKU-1", quantity=1)], request_id="request-1"
            )
            reply = pb_grpc.OrderServiceStub(channel).PlaceOrder(request, timeout=10)
        # A connection of its own sees the row: the handler committed before it replied.
        with closing(pg_connect(url)) as connection, connection.cursor() as cursor:
            cursor.execute(f"SELECT id, customer_id, request_id FROM {TABLE}")
            rows = cursor.fetchall()
        assert rows == [(int(reply.order.order_id), "bench-1", "request-1")]
    finally:
        assert server.stop() == [0]


def test_a_bare_stack_started_again_in_the_same_folder_waits_for_its_own_ready_line(
    make_pg_database, tmp_path: Path
):
    """The log is appended to: the second start must not take the first one's port from it."""
    url = make_pg_database()
    first = BareStackServer(url, tmp_path, "again")
    assert first.stop() == [0]

    second = BareStackServer(url, tmp_path, "again")
    try:
        # On the first one's port nothing listens any more: the call would be UNAVAILABLE.
        with grpc.insecure_channel(second.address) as channel:
            item = pb.OrderItem(sku="SKU-1", quantity=1)
            request = pb.PlaceOrderRequest(customer_id="bench-2", items=[item])
            assert pb_grpc.OrderServiceStub(channel).PlaceOrder(request, timeout=10).order.order_id
    finally:
        assert second.stop() == [0]
