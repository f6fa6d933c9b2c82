"""grpc.health.v1 follows the database and its schema; reflection lists the services without a .proto."""

from __future__ import annotations

import uuid

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from orders_service_api.v1 import orders_pb2 as pb

from tests.integration.helpers import health_status, rpc_error
from tests.support import apply_schema, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "orders.v1.OrderService", "orders.v1.InventoryService")


def test_a_server_on_a_migrated_database_is_serving(quiet_server):
    assert {service: health_status(quiet_server, service) for service in SERVICES} == dict.fromkeys(
        SERVICES, "SERVING"
    )
    unknown = rpc_error(health_status, quiet_server, "orders.v1.NoSuchService")
    assert unknown.code() == grpc.StatusCode.NOT_FOUND


def migrate(database_url: str) -> None:
    apply_schema(database_url)


def statuses_until_the_stream_ends(watch) -> list[int]:
    seen = []
    try:
        for response in watch:
            seen.append(response.status)
    except grpc.RpcError:
        pass
    return seen


def test_an_unmigrated_database_is_not_serving_until_the_migrations_run(database_url, start_server):
    server = start_server(database_url=database_url, migrate_on_start="never")
    health = health_pb2_grpc.HealthStub(server.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)

    assert next(watch).status == NOT_SERVING
    assert {service: health_status(server, service) for service in SERVICES} == dict.fromkeys(
        SERVICES, "NOT_SERVING"
    )
    unknown = pb.GetOrderRequest(order_id=str(uuid.uuid4()))
    unmigrated = rpc_error(server.stubs.orders.GetOrder, unknown, timeout=10)
    assert unmigrated.code() == grpc.StatusCode.UNAVAILABLE

    migrate(database_url)

    wait_until(
        lambda: all(health_status(server, service) == "SERVING" for service in SERVICES),
        what="every service SERVING",
    )
    assert SERVING in (response.status for response in watch)  # Watch streams the change
    # The service works in full now, the saga included: an unknown SKU ends the order FAILED.
    placed = server.stubs.place("alice", [("NOT-IN-STOCK", 1)])
    failed = wait_until(
        lambda: (order := server.stubs.get(placed.order_id)).status == pb.ORDER_STATUS_FAILED and order,
        what="the saga to settle the order",
    )
    assert "NOT-IN-STOCK" in failed.failure_reason

    server.service.stop(grace=0.1)

    assert statuses_until_the_stream_ends(watch)[-1:] == [NOT_SERVING]


def test_health_watch_streams_hold_no_handler_threads_and_hear_not_serving_at_shutdown(
    database_url, start_server
):
    server = start_server(database_url=database_url, max_workers=2, saga_workers=0)
    stub = health_pb2_grpc.HealthStub(server.channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10) for _ in range(4)]

    assert [next(watch).status for watch in watches] == [SERVING] * 4
    request = pb.PlaceOrderRequest(customer_id="c1", items=[pb.OrderItem(sku="S", quantity=1)])
    placed = server.stubs.orders.PlaceOrder(request, timeout=2).order
    read_back = server.stubs.orders.GetOrder(pb.GetOrderRequest(order_id=placed.order_id), timeout=2).order
    assert read_back == placed

    server.service.stop(grace=0.1)

    assert [statuses_until_the_stream_ends(watch)[-1:] for watch in watches] == [[NOT_SERVING]] * 4


def test_reflection_lists_the_order_inventory_and_health_services(quiet_server):
    database = ProtoReflectionDescriptorDatabase(quiet_server.channel)

    services = set(database.get_services())

    assert {"orders.v1.OrderService", "orders.v1.InventoryService", "grpc.health.v1.Health"} <= services
    pool = DescriptorPool(database)
    assert [m.name for m in pool.FindServiceByName("orders.v1.OrderService").methods] == [
        "PlaceOrder",
        "GetOrder",
        "ListOrders",
        "CancelOrder",
        "WatchOrder",
    ]
    assert [m.name for m in pool.FindServiceByName("orders.v1.InventoryService").methods] == [
        "SetStock",
        "GetStock",
    ]
    order = pool.FindMessageTypeByName("orders.v1.Order")
    assert {"order_id", "customer_id", "items", "status", "failure_reason", "version"} <= set(
        order.fields_by_name
    )


def test_unknown_methods_answer_unimplemented_so_clients_can_fall_back(quiet_server):
    reflection_v1 = quiet_server.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    )
    unknown_rpc = quiet_server.channel.unary_unary("/orders.v1.OrderService/DeleteEverything")

    assert rpc_error(reflection_v1, iter([b""]), timeout=5).code() == grpc.StatusCode.UNIMPLEMENTED
    assert rpc_error(unknown_rpc, b"", timeout=5).code() == grpc.StatusCode.UNIMPLEMENTED
