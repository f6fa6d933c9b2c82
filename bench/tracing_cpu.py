"""Server CPU per PlaceOrder with tracing off and on, the saga included, on PostgreSQL.

Each round starts a real `orders-server` on a fresh database, places `--calls` orders from a few
client threads after a warm-up, waits for the sagas, and divides the server process's CPU time
(utime + stime from /proc, Linux only) by the calls. "On" exports over OTLP/gRPC to a collector
that this process runs (it counts the spans and drops them), so the figure includes the SDK's
batching, encoding and sending. Rounds alternate off and on; read the spread between rounds of
the same kind before the difference between kinds, on a shared machine above all.

    .venv/bin/python -m bench.tracing_cpu --rounds 3 --calls 6000

Needs the local PostgreSQL (ORDERS_TEST_PG_URL, as the tests) and the otel extra (`make venv`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from orders_service_api.v1 import orders_pb2 as pb
from orders_service_api.v1 import orders_pb2_grpc as pb_grpc

from tests.local_services import (
    ROOT,
    OrdersServer,
    create_database,
    drop_databases,
    server_command,
    server_env,
    with_database,
)

ADMIN_URL = os.environ.get("ORDERS_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector that counts what it receives and keeps nothing."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.spans += sum(len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(extra: Sequence[str], env: dict[str, str], calls: int, threads: int, work: Path) -> float:
    """Microseconds of server CPU per PlaceOrder."""
    name = create_database(ADMIN_URL, "orders_bench_tracing")
    url = with_database(ADMIN_URL, name)
    try:
        subprocess.run(
            [*server_command(), "migrate", "--database-url", url],
            env=server_env(env),
            check=True,
            capture_output=True,
        )
        server = OrdersServer(
            ["--port", "0", "--database-url", url, *extra], server_env(env), ROOT, work / f"{name}.log"
        )
        try:
            with grpc.insecure_channel(server.address) as channel:
                orders = pb_grpc.OrderServiceStub(channel)
                pb_grpc.InventoryServiceStub(channel).SetStock(
                    pb.SetStockRequest(sku="BENCH", available=10**9), timeout=10
                )
                request = pb.PlaceOrderRequest(
                    customer_id="bench", items=[pb.OrderItem(sku="BENCH", quantity=1)]
                )
                for _ in range(200):  # warm-up: connections, caches
                    orders.PlaceOrder(request, timeout=10)
                time.sleep(1)
                before = _cpu_seconds(server.proc.pid)

                def place() -> None:
                    for _ in range(calls // threads):
                        orders.PlaceOrder(request, timeout=10)

                clients = [threading.Thread(target=place) for _ in range(threads)]
                for client in clients:
                    client.start()
                for client in clients:
                    client.join()
                time.sleep(2)  # the last sagas, and the last batch of spans
                return (_cpu_seconds(server.proc.pid) - before) / (calls // threads * threads) * 1e6
        finally:
            server.stop()
    finally:
        drop_databases(ADMIN_URL, [name])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each kind, alternating")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    work = Path("var/bench-tracing")
    work.mkdir(parents=True, exist_ok=True)
    try:
        for _ in range(args.rounds):
            for label, extra in (("off", []), ("on (otlp)", ["--otel-exporter", "otlp"])):
                spans = collector.spans
                us = one_round(extra, otlp, args.calls, args.threads, work)
                print(
                    f"tracing {label}: {us:.0f} us of server CPU per PlaceOrder, saga included "
                    f"({collector.spans - spans} spans exported)",
                    flush=True,
                )
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
