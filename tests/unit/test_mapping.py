"""Protobuf messages to domain values and back, without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from orders_service_api.v1 import orders_pb2 as pb

from domain.errors import ValidationError
from domain.inventory import StockLevel, insufficient_stock, unknown_sku
from domain.model import Order, OrderItem, OrderStatus, Settlement
from server import mapping

PLACED_AT = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "value"),
    [
        (OrderStatus.PENDING, pb.ORDER_STATUS_PENDING),
        (OrderStatus.VALIDATED, pb.ORDER_STATUS_VALIDATED),
        (OrderStatus.FAILED, pb.ORDER_STATUS_FAILED),
        (OrderStatus.CANCELLED, pb.ORDER_STATUS_CANCELLED),
    ],
    ids=lambda s: getattr(s, "value", str(s)),
)
def test_each_status_maps_to_its_enum_value_and_back(status: OrderStatus, value: int) -> None:
    assert mapping.STATUS_TO_PB[status] == value
    assert mapping.status_filter(value) is status


def test_unspecified_status_filter_means_any_status() -> None:
    assert mapping.status_filter(pb.ORDER_STATUS_UNSPECIFIED) is None


@pytest.mark.parametrize("value", [5, 99, -1])
def test_unknown_status_enum_is_rejected_on_the_status_field(value: int) -> None:
    with pytest.raises(ValidationError) as raised:
        mapping.status_filter(value)
    assert [v.field for v in raised.value.violations] == ["status"]


def test_place_request_maps_to_a_command_with_values_as_sent() -> None:
    request = pb.PlaceOrderRequest(
        customer_id=" Ünïcode ",
        items=[pb.OrderItem(sku="b-2", quantity=3), pb.OrderItem(sku="A.1", quantity=1)],
        request_id="key-1",
    )
    command = mapping.place_command(request)
    assert command.customer_id == " Ünïcode "
    assert command.items == (OrderItem("b-2", 3), OrderItem("A.1", 1))
    assert command.request_id == "key-1"


def test_place_request_violations_use_proto_field_paths() -> None:
    request = pb.PlaceOrderRequest(
        customer_id="c1", items=[pb.OrderItem(sku="A", quantity=1), pb.OrderItem(sku="B", quantity=0)]
    )
    with pytest.raises(ValidationError) as raised:
        mapping.place_command(request)
    assert [v.field for v in raised.value.violations] == ["items[1].quantity"]


def test_order_maps_to_a_message_field_by_field() -> None:
    placed, _ = Order.place("customer-1", (OrderItem("SKU-1", 2),), now=PLACED_AT)
    failed = placed.settle(Settlement.failed("unknown SKU 'SKU-1'"), now=PLACED_AT + timedelta(seconds=1))
    message = mapping.order_to_pb(failed)
    assert message.order_id == failed.order_id
    assert message.customer_id == "customer-1"
    assert [(i.sku, i.quantity) for i in message.items] == [("SKU-1", 2)]
    assert message.status == pb.ORDER_STATUS_FAILED
    assert message.failure_reason == "unknown SKU 'SKU-1'"
    assert message.version == 2
    assert message.create_time.ToDatetime(tzinfo=UTC) == PLACED_AT
    assert message.update_time.ToDatetime(tzinfo=UTC) == PLACED_AT + timedelta(seconds=1)


def test_stock_level_maps_to_set_and_get_stock_responses() -> None:
    level = StockLevel("SKU-1", available=5, reserved=2, version=7)
    assert mapping.set_stock_response(level) == pb.SetStockResponse(
        sku="SKU-1", available=5, reserved=2, version=7
    )
    assert mapping.get_stock_response(level) == pb.GetStockResponse(
        sku="SKU-1", available=5, reserved=2, version=7
    )


def test_rejection_reasons_name_the_sku() -> None:
    assert "'SKU-9'" in unknown_sku("SKU-9").reason
    reason = insufficient_stock("SKU-9", requested=5, available=2).reason
    assert "'SKU-9'" in reason
    assert "5" in reason
    assert "2" in reason
