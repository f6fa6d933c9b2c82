"""The benchmark's operations, one call or one flow each, run by the client processes; stocking SKUs."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orders_service_api.v1 import orders_pb2 as pb
from orders_service_api.v1 import orders_pb2_grpc as pb_grpc

TIMEOUT_S = 30.0
TERMINAL = {pb.ORDER_STATUS_VALIDATED, pb.ORDER_STATUS_FAILED, pb.ORDER_STATUS_CANCELLED}


def sku_name(n: int) -> str:
    return f"BENCH-{n:04d}"


def _random_items(rng: random.Random, skus: int) -> list[pb.OrderItem]:
    chosen = rng.sample(range(skus), rng.randint(1, 3))
    return [pb.OrderItem(sku=sku_name(n), quantity=rng.randint(1, 3)) for n in chosen]


def health_op(channel: grpc.Channel, rng: random.Random, params: dict[str, Any]) -> Callable[[], str | None]:
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="")

    def op() -> str | None:
        stub.Check(request, timeout=TIMEOUT_S)
        return None

    return op


def place_op(channel: grpc.Channel, rng: random.Random, params: dict[str, Any]) -> Callable[[], str | None]:
    stub = pb_grpc.OrderServiceStub(channel)
    skus = int(params["skus"])

    def op() -> str | None:
        request = pb.PlaceOrderRequest(
            customer_id=f"bench-{rng.randrange(1000)}",
            items=_random_items(rng, skus),
            request_id=str(uuid.uuid4()),
        )
        stub.PlaceOrder(request, timeout=TIMEOUT_S)
        return None

    return op


def flow_op(channel: grpc.Channel, rng: random.Random, params: dict[str, Any]) -> Callable[[], str | None]:
    """PlaceOrder, then WatchOrder until the order settles; the outcome is its final status."""
    stub = pb_grpc.OrderServiceStub(channel)
    skus = int(params.get("skus", 0))
    hot_sku = str(params.get("hot_sku", ""))

    def op() -> str | None:
        items = [pb.OrderItem(sku=hot_sku, quantity=1)] if hot_sku else _random_items(rng, skus)
        request = pb.PlaceOrderRequest(
            customer_id=f"bench-{rng.randrange(1000)}", items=items, request_id=str(uuid.uuid4())
        )
        order = stub.PlaceOrder(request, timeout=TIMEOUT_S).order
        status = order.status
        if status not in TERMINAL:
            watch = pb.WatchOrderRequest(order_id=order.order_id)
            for update in stub.WatchOrder(watch, timeout=TIMEOUT_S):
                status = update.order.status
                if status in TERMINAL:
                    break
        if status not in TERMINAL:
            raise RuntimeError(f"watch ended with the order {pb.OrderStatus.Name(status)}")
        return str(pb.OrderStatus.Name(status))

    return op


def load_stock(address: str, stock: dict[str, int]) -> None:
    """SetStock for every SKU, a few calls at a time."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InventoryServiceStub(channel)

        def put(item: tuple[str, int]) -> None:
            stub.SetStock(pb.SetStockRequest(sku=item[0], available=item[1]), timeout=TIMEOUT_S)

        with ThreadPoolExecutor(32) as executor:
            list(executor.map(put, stock.items()))


def get_stock(address: str, sku: str) -> pb.GetStockResponse:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InventoryServiceStub(channel)
        response: pb.GetStockResponse = stub.GetStock(pb.GetStockRequest(sku=sku), timeout=TIMEOUT_S)
        return response
