"""Test helpers shared by the suites: waiting with a deadline, server processes, gRPC stubs."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from orders_service_api.v1 import orders_pb2 as pb
from orders_service_api.v1 import orders_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select

from db.tables import orders
from db.unit_of_work import OrdersUnitOfWork
from domain.model import Order, OrderItem, utcnow
from server import bootstrap
from server.config import Settings

# Shared with the benchmark; imported from here by the suites.
from tests.local_services import READY as READY
from tests.local_services import OrdersServer
from tests.local_services import server_command as server_command
from tests.local_services import server_env as server_env
from tests.local_services import wait_until as wait_until


def apply_schema(url: str) -> str:
    """Both schemas applied to the database at `url`, in this process; returns the URL."""
    engines = bootstrap.make_engines(Settings(database_url=url))
    try:
        bootstrap.apply_migrations(engines)
    finally:
        engines.dispose()
    return url


def place_in(uow: OrdersUnitOfWork, request_id: str) -> None:
    """One order of one item, placed in `uow` (not committed)."""
    order, placed = Order.place("ann", (OrderItem("SKU-1", 1),), request_id, now=utcnow())
    uow.add_order(order, "fingerprint", [placed], "corr-1")


def orders_stored(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(orders)).scalar_one())


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`orders-server ARGS` run to its end, output captured (stdout and stderr apart)."""
    return subprocess.run(
        [*server_command(), *args],
        env=server_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def migrate_database(url: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`orders-server migrate --database-url URL`, as an operator runs it; fails the test if it fails."""
    done = run_cli("migrate", "--database-url", url, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


# (name, sorted labels) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the sample `name` with exactly these labels, None if the endpoint had none."""
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape_metrics(port: int) -> Samples:
    """Every sample of the Prometheus endpoint on `port`, keyed by its name and sorted labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@dataclass
class Stubs:
    channel: grpc.Channel
    orders: pb_grpc.OrderServiceStub = field(init=False)
    inventory: pb_grpc.InventoryServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.orders = pb_grpc.OrderServiceStub(self.channel)
        self.inventory = pb_grpc.InventoryServiceStub(self.channel)

    def place(
        self, customer: str = "c1", items: Sequence[tuple[str, int]] = (("SKU-1", 1),), **kw: Any
    ) -> pb.Order:
        request = pb.PlaceOrderRequest(
            customer_id=customer, items=[pb.OrderItem(sku=s, quantity=q) for s, q in items], **kw
        )
        return self.orders.PlaceOrder(request, timeout=10).order

    def get(self, order_id: str) -> pb.Order:
        return self.orders.GetOrder(pb.GetOrderRequest(order_id=order_id), timeout=10).order

    def stock(self, sku: str) -> pb.GetStockResponse:
        return self.inventory.GetStock(pb.GetStockRequest(sku=sku), timeout=10)

    def set_stock(self, sku: str, available: int) -> pb.SetStockResponse:
        return self.inventory.SetStock(pb.SetStockRequest(sku=sku, available=available), timeout=10)


class ServerProcess(OrdersServer):
    """A real `orders-server` process with a channel and stubs on it; its log goes to a file the test
    can read."""

    def __init__(self, args: Sequence[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        super().__init__(args, env, cwd, log_path)
        self.channel = grpc.insecure_channel(self.address)
        self.stubs = Stubs(self.channel)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.channel.close()
        return super().stop(sig, timeout)
