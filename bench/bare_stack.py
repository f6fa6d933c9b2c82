"""The bare stack: the least a gRPC server doing one PostgreSQL write per call can cost here.

`python -m bench.bare_stack --database-url URL [--port P] [--reuseport]`: a sync grpcio server with
the service's channel options (server/connections.py) and handler-thread count, no interceptors,
serving PlaceOrder with a handler that runs one psycopg2 `INSERT ... RETURNING` and `COMMIT` on its
thread's own connection into a table of its own (`bare_stack_orders`, created at start). The
benchmark drives it with the same load generator and operation as the real PlaceOrder, so every
PlaceOrder figure can be read against it (issue 17; docs/performance.md, "The bare stack").
It prints `bare-stack ready on HOST:PORT` once it serves, and stops on SIGTERM.

`--cpu-index I` (default 0) pins the process to the CPU that `orders-server --cpu-affinity auto`
gives process I of a server (server/affinity.py), before any thread starts: the bare stack runs on
the same process set-up as the server it is the baseline of (`--cpu-index -1`: unpinned).
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

import grpc
from orders_service_api.v1 import orders_pb2 as pb
from orders_service_api.v1 import orders_pb2_grpc as pb_grpc

from server import affinity
from server.config import Settings
from server.connections import connection_options
from tests.local_services import pg_connect

TABLE = "bare_stack_orders"
READY_LINE = "bare-stack ready on"
_CREATE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    id bigserial PRIMARY KEY,
    customer_id text NOT NULL,
    request_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)"""
_INSERT = f"INSERT INTO {TABLE} (customer_id, request_id) VALUES (%s, %s) RETURNING id"  # noqa: S608


class BareOrders(pb_grpc.OrderServiceServicer):
    """PlaceOrder as one INSERT and COMMIT; every other method is grpcio's UNIMPLEMENTED."""

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._local = threading.local()

    def _connection(self) -> Any:
        # One connection per handler thread, opened on its first call (the warm-up's), never shared.
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = pg_connect(self._database_url)
        return connection

    def PlaceOrder(
        self, request: pb.PlaceOrderRequest, context: grpc.ServicerContext
    ) -> pb.PlaceOrderResponse:
        connection = self._connection()
        with connection, connection.cursor() as cursor:  # commits on leaving, rolls back on an error
            cursor.execute(_INSERT, (request.customer_id, request.request_id))
            row = cursor.fetchone()
        order = pb.Order(
            order_id=str(row[0]), customer_id=request.customer_id, status=pb.ORDER_STATUS_PENDING
        )
        return pb.PlaceOrderResponse(order=order)


def create_table(database_url: str) -> None:
    with closing(pg_connect(database_url)) as connection, connection, connection.cursor() as cursor:
        cursor.execute(_CREATE)


def create_server(database_url: str, address: str, reuseport: bool) -> tuple[grpc.Server, int]:
    """The bare-stack server bound to `address` (port 0 for any), not started; it and its port."""
    settings = Settings()
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="grpc"),
        # The service's options (server/bootstrap.py `_grpc_server`), reuseport only for N processes.
        options=[
            ("grpc.so_reuseport", 1 if reuseport else 0),
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            *connection_options(settings),
        ],
        maximum_concurrent_rpcs=None,
    )
    pb_grpc.add_OrderServiceServicer_to_server(BareOrders(database_url), server)
    port = server.add_insecure_port(address)
    return server, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_stack", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True, help="SQLAlchemy-style PostgreSQL URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reuseport", action="store_true", help="share the port with other processes")
    parser.add_argument("--cpu-index", type=int, default=0, help="pin as orders-server's process I (-1: no)")
    args = parser.parse_args(argv)
    if args.cpu_index >= 0:
        affinity.pin(affinity.AUTO, args.cpu_index)  # no guard: the bench pins nothing else there
    create_table(args.database_url)
    server, port = create_server(args.database_url, f"{args.host}:{args.port}", args.reuseport)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    gc.freeze()  # as orders-server does once started: collections scan only what came after
    print(f"{READY_LINE} {args.host}:{port}", flush=True)
    stop.wait()
    server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
