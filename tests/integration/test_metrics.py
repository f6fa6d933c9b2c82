"""The Prometheus endpoint: the numbers move as orders flow."""

import grpc
import pytest
from orders_service_api.v1 import orders_pb2 as pb

from tests.local_services import free_port
from tests.support import Samples, sample, scrape_metrics, wait_until


def _value(samples: Samples, name: str, **labels: str) -> float:
    return sample(samples, name, **labels) or 0.0


def test_metrics_count_calls_saga_outcomes_and_dispatch_lag(start_server, database_url):
    port = free_port()
    server = start_server(database_url=database_url, metrics_port=port, housekeeping_interval_s=0.2)
    before = scrape_metrics(port)
    server.stubs.set_stock("M-1", 3)
    placed = [server.stubs.place("metrics", [("M-1", 1)]) for _ in range(5)]
    wait_until(
        lambda: all(server.stubs.get(o.order_id).status != pb.ORDER_STATUS_PENDING for o in placed),
        what="orders settled",
    )

    def with_both_failures() -> Samples | None:
        samples = scrape_metrics(port)
        return samples if _value(samples, "orders_saga_outcomes_total", outcome="failed") >= 2 else None

    after = wait_until(with_both_failures, what="saga outcomes scraped")
    place = "/orders.v1.OrderService/PlaceOrder"
    assert (
        _value(after, "orders_rpc_total", method=place, code="OK")
        - _value(before, "orders_rpc_total", method=place, code="OK")
        == 5
    )
    assert _value(after, "orders_saga_outcomes_total", outcome="validated") == 3
    assert _value(after, "orders_saga_outcomes_total", outcome="failed") == 2
    assert _value(after, "orders_outbox_dispatch_lag_seconds_count") >= 5
    assert _value(after, "orders_outbox_events_total", event_type="ORDER_CREATED", outcome="done") == 5
    assert _value(after, "orders_breaker_state") == 0
    assert "orders_db_pool_in_use_orders" in {name for name, _ in after}
    # The backlog gauge is refreshed by housekeeping: nothing is pending once all settled.
    wait_until(lambda: _value(scrape_metrics(port), "orders_outbox_backlog") == 0, what="backlog drained")


def test_bad_requests_are_counted_with_their_code(start_server, sqlite_url):
    port = free_port()
    server = start_server(database_url=sqlite_url, metrics_port=port, saga_workers=0)
    with pytest.raises(grpc.RpcError):
        server.stubs.orders.GetOrder(pb.GetOrderRequest(order_id="not-a-uuid"), timeout=5)
    samples = scrape_metrics(port)
    method = "/orders.v1.OrderService/GetOrder"
    assert _value(samples, "orders_rpc_total", method=method, code="INVALID_ARGUMENT") == 1
