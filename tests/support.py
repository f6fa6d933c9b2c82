"""Test helpers shared by the suites: waiting with a deadline, server processes, gRPC stubs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from generated.orders.v1 import orders_pb2 as pb
from generated.orders.v1 import orders_pb2_grpc as pb_grpc
from server import bootstrap
from server.config import Settings

T = TypeVar("T")

READY = re.compile(r"orders-server ready on (?P<host>\S+):(?P<port>\d+)")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate!r} (last: {last!r})")


def server_command() -> list[str]:
    """`orders-server` as the README installs it (the venv's console script)."""
    script = Path(sys.executable).parent / "orders-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.main"]


def apply_schema(url: str) -> str:
    """Both schemas applied to the database at `url`, in this process; returns the URL."""
    engines = bootstrap.make_engines(Settings(database_url=url))
    try:
        bootstrap.apply_migrations(engines)
    finally:
        engines.dispose()
    return url


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


class ServerProcess:
    """A real `orders-server` process; its stderr (the log) goes to a file the test can read."""

    def __init__(self, args: Sequence[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*server_command(), *args], env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT
        )
        match = wait_until(self._ready, timeout=30, what="the ready line")
        self.port = int(match.group("port"))
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stubs = Stubs(self.channel)

    def _ready(self) -> re.Match[str] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"orders-server exited with {self.proc.returncode}:\n{self.log()}")
        return READY.search(self.log())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    # Without the installed console script the server runs as `python -m server.main` from the repo.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")])
    )
    env.update(extra or {})
    return env
