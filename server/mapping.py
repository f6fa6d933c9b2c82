"""Protobuf messages to validated domain values and back."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from orders_service_api.v1 import orders_pb2 as pb

from domain import validation
from domain.errors import FieldViolation, ValidationError
from domain.inventory import StockLevel
from domain.model import Order, OrderStatus

STATUS_TO_PB = {
    OrderStatus.PENDING: pb.ORDER_STATUS_PENDING,
    OrderStatus.VALIDATED: pb.ORDER_STATUS_VALIDATED,
    OrderStatus.FAILED: pb.ORDER_STATUS_FAILED,
    OrderStatus.CANCELLED: pb.ORDER_STATUS_CANCELLED,
}
STATUS_FROM_PB: dict[int, OrderStatus] = {int(value): key for key, value in STATUS_TO_PB.items()}


def place_command(request: pb.PlaceOrderRequest) -> validation.PlaceOrderCommand:
    return validation.place_order(
        request.customer_id, [(item.sku, item.quantity) for item in request.items], request.request_id
    )


def status_filter(value: int) -> OrderStatus | None:
    if value == pb.ORDER_STATUS_UNSPECIFIED:
        return None
    if value not in STATUS_FROM_PB:
        raise ValidationError([FieldViolation("status", f"unknown order status {value}")])
    return STATUS_FROM_PB[value]


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def order_to_pb(order: Order) -> pb.Order:
    return pb.Order(
        order_id=order.order_id,
        customer_id=order.customer_id,
        items=[pb.OrderItem(sku=i.sku, quantity=i.quantity) for i in order.items],
        status=STATUS_TO_PB[order.status],
        failure_reason=order.failure_reason,
        version=order.version,
        create_time=_timestamp(order.create_time),
        update_time=_timestamp(order.update_time),
    )


def set_stock_response(level: StockLevel) -> pb.SetStockResponse:
    return pb.SetStockResponse(
        sku=level.sku, available=level.available, reserved=level.reserved, version=level.version
    )


def get_stock_response(level: StockLevel) -> pb.GetStockResponse:
    return pb.GetStockResponse(
        sku=level.sku, available=level.available, reserved=level.reserved, version=level.version
    )
