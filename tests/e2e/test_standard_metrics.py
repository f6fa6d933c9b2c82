"""A real `orders-server`'s /metrics holds the names that gRPC dashboards know (go-grpc-prometheus'
`grpc_server_*`), process and garbage-collector metrics, and `orders_build_info`, beside the
service's own (docs/operations.md, "Metrics and alerts")."""

from __future__ import annotations

import platform

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from orders_service_api.v1 import orders_pb2 as pb

from tests.local_services import free_port
from tests.support import Samples, run_cli, sample, scrape_metrics, wait_until

pytestmark = pytest.mark.e2e

ORDERS = "orders.v1.OrderService"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


def grpc_labels(kind: str, service: str, method: str) -> dict[str, str]:
    return {"grpc_type": kind, "grpc_service": service, "grpc_method": method}


def test_grpc_server_metrics_count_calls_codes_messages_and_latency(spawn_server):
    metrics_port = free_port()
    server = spawn_server("--metrics-port", str(metrics_port), "--max-health-watch-streams", "1")
    stubs = server.stubs
    stubs.set_stock("STD-1", 5)
    placed = stubs.place("standard-metrics", [("STD-1", 1)])
    for bad in ("not-a-uuid", "00000000-0000-4000-8000-000000000000"):
        with pytest.raises(grpc.RpcError):
            stubs.orders.GetOrder(pb.GetOrderRequest(order_id=bad), timeout=5)
    wait_until(lambda: stubs.get(placed.order_id).status != pb.ORDER_STATUS_PENDING, what="order settled")
    # A settled order's watch sends it once and ends OK.
    assert len(list(stubs.orders.WatchOrder(pb.WatchOrderRequest(order_id=placed.order_id), timeout=10))) == 1
    # One Health/Watch stays open (the cap is 1): a second one is refused at admission.
    health = health_pb2_grpc.HealthStub(server.channel)
    open_watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(open_watch).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as refused:
        next(health.Watch(health_pb2.HealthCheckRequest(), timeout=10))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    open_watch.cancel()
    # Reflection is a bidirectional stream: two requests in, two answers out.
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    asked = [reflection_pb2.ServerReflectionRequest(list_services="")] * 2
    assert len(list(reflection.ServerReflectionInfo(iter(asked), timeout=10))) == 2

    place = grpc_labels("unary", ORDERS, "PlaceOrder")
    get = grpc_labels("unary", ORDERS, "GetOrder")
    watch = grpc_labels("server_stream", ORDERS, "WatchOrder")
    health_watch = grpc_labels("server_stream", HEALTH, "Watch")
    reflect = grpc_labels("bidi_stream", REFLECTION, "ServerReflectionInfo")

    def settled() -> Samples | None:
        # Streams are counted as handled when grpcio ends them, just after the client saw the end.
        samples = scrape_metrics(metrics_port)
        watches_ended = sample(samples, "grpc_server_handled_total", **watch, grpc_code="OK") == 1
        return samples if watches_ended and sample(samples, "grpc_server_started_total", **reflect) else None

    samples = wait_until(settled, what="the streams counted as handled")

    assert sample(samples, "grpc_server_started_total", **place) == 1
    assert sample(samples, "grpc_server_handled_total", **place, grpc_code="OK") == 1
    assert sample(samples, "grpc_server_msg_received_total", **place) == 1
    assert sample(samples, "grpc_server_msg_sent_total", **place) == 1
    assert sample(samples, "grpc_server_handling_seconds_count", **place) == 1
    assert sample(samples, "grpc_server_handling_seconds_bucket", **place, le="+Inf") == 1
    assert (sample(samples, "grpc_server_handling_seconds_sum", **place) or 0) > 0
    # Status codes are spelled as Go spells them, for the dashboards written for go-grpc-prometheus.
    assert (sample(samples, "grpc_server_started_total", **get) or 0) >= 2
    assert sample(samples, "grpc_server_handled_total", **get, grpc_code="InvalidArgument") == 1
    assert sample(samples, "grpc_server_handled_total", **get, grpc_code="NotFound") == 1
    assert sample(samples, "grpc_server_msg_sent_total", **get) == sample(
        samples, "grpc_server_handled_total", **get, grpc_code="OK"
    )
    assert sample(samples, "grpc_server_started_total", **watch) == 1
    assert sample(samples, "grpc_server_msg_sent_total", **watch) == 1
    # The refused Health/Watch started and ended ResourceExhausted, as a Go server counts it.
    assert sample(samples, "grpc_server_started_total", **health_watch) == 2
    assert sample(samples, "grpc_server_handled_total", **health_watch, grpc_code="ResourceExhausted") == 1
    assert (sample(samples, "grpc_server_msg_sent_total", **health_watch) or 0) >= 1
    assert sample(samples, "grpc_server_msg_received_total", **reflect) == 2
    assert sample(samples, "grpc_server_msg_sent_total", **reflect) == 2
    # The service's own names are still there, with Python's spelling of the codes.
    own = {"method": f"/{ORDERS}/GetOrder", "code": "INVALID_ARGUMENT"}
    assert sample(samples, "orders_rpc_total", **own) == 1


def test_process_gc_and_build_metrics_describe_the_running_server(spawn_server):
    metrics_port = free_port()
    server = spawn_server("--metrics-port", str(metrics_port))
    server.stubs.set_stock("STD-2", 1)

    samples = scrape_metrics(metrics_port)

    assert (sample(samples, "process_cpu_seconds_total") or 0) > 0
    assert (sample(samples, "process_resident_memory_bytes") or 0) > 10_000_000
    assert (sample(samples, "process_open_fds") or 0) > 0
    assert (sample(samples, "process_start_time_seconds") or 0) > 0
    assert sample(samples, "python_gc_objects_collected_total", generation="0") is not None
    version = run_cli("--version").stdout.split()[-1]
    build = {"version": version, "python": platform.python_version(), "grpcio": grpc.__version__}
    assert sample(samples, "orders_build_info", **build) == 1
