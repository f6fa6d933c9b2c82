"""PlaceOrder writes the order, its items and its ORDER_CREATED outbox event together or not at all."""

from __future__ import annotations

import json
import uuid

import grpc
from orders_service_api.v1 import orders_pb2 as pb

import db.outbox
from db.tables import order_items, orders, outbox_events
from tests.integration.helpers import headers, place_request, rows_of, rpc_error


def test_a_placed_order_is_stored_with_its_items_and_one_order_created_event(quiet_server):
    request = place_request("alice", [("SKU-B", 2), ("SKU-A", 5)])

    response, call = quiet_server.stubs.orders.PlaceOrder.with_call(
        request, metadata=[("x-correlation-id", "checkout-42")], timeout=10
    )

    order = response.order
    assert order.status == pb.ORDER_STATUS_PENDING
    assert order.version == 1
    assert dict(call.initial_metadata())["x-correlation-id"] == "checkout-42"
    rows = rows_of(quiet_server)
    assert rows.totals() == (1, 2, 1)
    stored = rows.order(order.order_id)
    assert (stored.customer_id, stored.status, stored.version) == ("alice", "PENDING", 1)
    assert rows.items(order.order_id) == [("SKU-B", 2), ("SKU-A", 5)]
    [event] = rows.events(order.order_id)
    assert event.event_type == "ORDER_CREATED"
    assert headers(event) == {"correlation_id": "checkout-42"}
    assert json.loads(event.payload) == {
        "order_id": order.order_id,
        "customer_id": "alice",
        "items": [{"sku": "SKU-B", "quantity": 2}, {"sku": "SKU-A", "quantity": 5}],
    }


def test_without_a_correlation_header_a_new_id_is_echoed_and_stored_with_the_event(quiet_server):
    response, call = quiet_server.stubs.orders.PlaceOrder.with_call(place_request(), timeout=10)

    echoed = dict(call.initial_metadata())["x-correlation-id"]
    assert uuid.UUID(echoed).version == 4
    [event] = rows_of(quiet_server).events(response.order.order_id, "ORDER_CREATED")
    assert headers(event) == {"correlation_id": echoed}


def test_an_invalid_correlation_header_is_replaced_by_a_new_id(quiet_server):
    for invalid in ("has spaces!", "x" * 129):
        response, call = quiet_server.stubs.orders.PlaceOrder.with_call(
            place_request(), metadata=[("x-correlation-id", invalid)], timeout=10
        )

        echoed = dict(call.initial_metadata())["x-correlation-id"]
        assert uuid.UUID(echoed).version == 4, invalid
        [event] = rows_of(quiet_server).events(response.order.order_id, "ORDER_CREATED")
        assert headers(event) == {"correlation_id": echoed}, invalid


def test_values_are_stored_and_returned_exactly_as_sent(quiet_server):
    customer = "  Zoë 李  "  # spaces, accents and CJK, no trimming or normalisation
    placed = quiet_server.stubs.place(customer, [("sku-a", 1), ("SKU-a", 2)])

    assert placed.customer_id == customer
    assert [(i.sku, i.quantity) for i in placed.items] == [("sku-a", 1), ("SKU-a", 2)]
    assert quiet_server.stubs.get(placed.order_id) == placed
    assert rows_of(quiet_server).order(placed.order_id).customer_id == customer


def refused_outbox_rows(reached: list[str]):
    """Outbox rows the database itself refuses (NULL status), written after the order and its
    items: on SQLite as the third statement, on PostgreSQL inside the one statement with them."""
    real = db.outbox.OutboxStore.new_rows

    def new_rows(events, correlation_id, now, lease=None, dialect="sqlite"):
        reached.append("outbox")
        return [{**row, "status": None} for row in real(events, correlation_id, now, lease, dialect)]

    return staticmethod(new_rows)


def test_an_outbox_failure_after_the_order_insert_leaves_neither_row(quiet_server, monkeypatch):
    reached: list[str] = []
    monkeypatch.setattr(db.outbox.OutboxStore, "new_rows", refused_outbox_rows(reached))

    error = rpc_error(
        quiet_server.stubs.orders.PlaceOrder,
        place_request("bob", [("SKU-1", 1)], request_id="req-atomic"),
        metadata=[("x-correlation-id", "atomic-1")],
        timeout=10,
    )

    assert reached == ["outbox"]
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "null" not in error.details().lower(), "database details stay in the server's log"
    assert "atomic-1" in error.details()
    rows = rows_of(quiet_server)
    assert rows.count(orders) == 0
    assert rows.count(order_items) == 0
    assert rows.count(outbox_events) == 0


def test_after_a_failed_write_the_same_request_id_places_the_order_normally(quiet_server, monkeypatch):
    monkeypatch.setattr(db.outbox.OutboxStore, "new_rows", refused_outbox_rows([]))
    request = place_request("bob", [("SKU-1", 1)], request_id="req-retry")
    assert (
        rpc_error(quiet_server.stubs.orders.PlaceOrder, request, timeout=10).code()
        == grpc.StatusCode.INTERNAL
    )
    monkeypatch.undo()

    placed = quiet_server.stubs.orders.PlaceOrder(request, timeout=10).order

    rows = rows_of(quiet_server)
    assert rows.totals() == (1, 1, 1)
    assert rows.order(placed.order_id).request_id == "req-retry"
    assert len(rows.events(placed.order_id, "ORDER_CREATED")) == 1
