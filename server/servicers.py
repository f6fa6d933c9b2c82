"""gRPC servicers: map the request, call one application method, map the result. No rules, no SQL."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from orders_service_api.v1 import orders_pb2 as pb
from orders_service_api.v1 import orders_pb2_grpc as pb_grpc

from application.orders import OrderApplication
from application.watching import OrderWatcher
from domain import validation
from domain.model import Order
from server import mapping
from server.errors import to_status
from server.nonblocking import non_blocking

SendResponse = Callable[[pb.WatchOrderResponse | None], None]


class OrderServicer(pb_grpc.OrderServiceServicer):
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

    # application.watching sends from its own few threads, not from a handler thread per stream. The
    # base class has the blocking form (a generator of responses); grpcio calls this one with `send`.
    @non_blocking
    def WatchOrder(  # type: ignore[override]
        self, request: pb.WatchOrderRequest, context: grpc.ServicerContext, send: SendResponse
    ) -> None:
        order_id = validation.order_id(request.order_id)
        self._watcher.open(order_id, _WatchCall(context, send))


class _WatchCall:
    """A WatchOrder call as application.watching sees it: orders go out as messages, the end as a status."""

    def __init__(self, context: grpc.ServicerContext, send: SendResponse) -> None:
        self._context = context
        self._send = send

    def send(self, order: Order) -> bool:
        self._send(pb.WatchOrderResponse(order=mapping.order_to_pb(order)))
        return bool(self._context.is_active())

    def end(self, error: Exception | None) -> None:
        if error is not None:
            status = to_status(error)
            self._context.set_trailing_metadata(status.trailing_metadata)
            self._context.set_code(status.code)
            self._context.set_details(status.details)
        self._send(None)

    def on_done(self, callback: Callable[[], None]) -> None:
        if not self._context.add_callback(callback):
            callback()


class InventoryServicer(pb_grpc.InventoryServiceServicer):
    def __init__(self, app: OrderApplication) -> None:
        self._app = app

    def SetStock(self, request: pb.SetStockRequest, context: grpc.ServicerContext) -> pb.SetStockResponse:
        level = self._app.set_stock(validation.sku(request.sku), validation.stock_quantity(request.available))
        return mapping.set_stock_response(level)

    def GetStock(self, request: pb.GetStockRequest, context: grpc.ServicerContext) -> pb.GetStockResponse:
        level = self._app.get_stock(validation.sku(request.sku))
        return mapping.get_stock_response(level)
