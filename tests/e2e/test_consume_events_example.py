"""examples/consume_events.py, the consumer that docs/operations.md shows, run as a user would:
against a real `orders-server` process relaying to the local NATS JetStream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from orders_service_api.v1 import orders_pb2 as pb

from tests.local_services import ROOT
from tests.support import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("nats_url")]

EXAMPLE = ROOT / "examples" / "consume_events.py"


def run_example(event_stream, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        str(EXAMPLE),
        "--url",
        event_stream.url,
        "--stream",
        event_stream.name,
        "--subjects",
        f"{event_stream.prefix}.>",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_the_consumer_example_prints_each_event_once(spawn_server, event_stream, tmp_path: Path):
    server = spawn_server(
        "--database-url", f"sqlite:///{tmp_path / 'orders.db'}", *event_stream.server_args()
    )
    server.stubs.set_stock("WIDGET-1", 10)
    request = pb.PlaceOrderRequest(customer_id="erin", items=[pb.OrderItem(sku="WIDGET-1", quantity=3)])
    order = server.stubs.orders.PlaceOrder(
        request, timeout=10, metadata=[("x-correlation-id", "example-1")]
    ).order
    wait_until(lambda: server.stubs.get(order.order_id).status == pb.ORDER_STATUS_VALIDATED, timeout=20)

    first = run_example(event_stream, "--durable", "billing", "--count", "2", "--idle-s", "20")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"{event_stream.prefix}.placed {order.order_id}:1 PENDING correlation=example-1",
        f"{event_stream.prefix}.validated {order.order_id}:2 VALIDATED correlation=example-1",
    ]
    # The durable consumer acknowledged both: a second run of it has nothing left to handle.
    again = run_example(event_stream, "--durable", "billing", "--idle-s", "1")
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert "handled 0 events" in again.stderr
