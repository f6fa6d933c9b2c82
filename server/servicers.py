"""gRPC servicers: map the request, call one application method, map the result. No rules, no SQL."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from domain import validation
from generated.orders.v1 import orders_pb2 as pb
from generated.orders.v1 import orders_pb2_grpc as pb_grpc
from server import mapping
from server.application import OrderApplication
from server.watch import OrderWatcher


class OrderServicer(pb_grpc.OrderServiceServicer):  # type: ignore[misc]
    def __init__(self, app: OrderApplication, watcher: OrderWatcher) -> None:
        self._app = app
        self._watcher = watcher

    def PlaceOrder(
        self, request: pb.PlaceOrderRequest, context: grpc.ServicerContext
    ) -> pb.PlaceOrderResponse:
        order = self._app.place_order(mapping.place_command(request))
        return pb.PlaceOrderResponse(order=mapping.order_to_pb(order))

    def GetOrder(self, request: pb.GetOrderRequest, context: grpc.ServicerContext) -> pb.GetOrderResponse:
        order = self._app.get_order(validation.order_id(request.order_id))
        return pb.GetOrderResponse(order=mapping.order_to_pb(order))

    def ListOrders(
        self, request: pb.ListOrdersRequest, context: grpc.ServicerContext
    ) -> pb.ListOrdersResponse:
        page = self._app.list_orders(
            customer_id=validation.customer_filter(request.customer_id),
            status=mapping.status_filter(request.status),
            page_size=validation.page_size(request.page_size),
            page_token=request.page_token,
        )
        return pb.ListOrdersResponse(
            orders=[mapping.order_to_pb(o) for o in page.orders], next_page_token=page.next_page_token
        )

    def CancelOrder(
        self, request: pb.CancelOrderRequest, context: grpc.ServicerContext
    ) -> pb.CancelOrderResponse:
        order = self._app.cancel_order(
            validation.order_id(request.order_id), validation.expected_version(request.expected_version)
        )
        return pb.CancelOrderResponse(order=mapping.order_to_pb(order))

    def WatchOrder(
        self, request: pb.WatchOrderRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchOrderResponse]:
        order_id = validation.order_id(request.order_id)
        for order in self._watcher.watch(order_id, is_active=context.is_active):
            yield pb.WatchOrderResponse(order=mapping.order_to_pb(order))


class InventoryServicer(pb_grpc.InventoryServiceServicer):  # type: ignore[misc]
    def __init__(self, app: OrderApplication) -> None:
        self._app = app

    def SetStock(self, request: pb.SetStockRequest, context: grpc.ServicerContext) -> pb.SetStockResponse:
        level = self._app.set_stock(validation.sku(request.sku), validation.stock_quantity(request.available))
        return mapping.set_stock_response(level)

    def GetStock(self, request: pb.GetStockRequest, context: grpc.ServicerContext) -> pb.GetStockResponse:
        level = self._app.get_stock(validation.sku(request.sku))
        return mapping.get_stock_response(level)
