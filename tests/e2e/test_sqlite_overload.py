"""On SQLite (the embedded default), a server pushed by a closed loop of PlaceOrder runs the sagas of
what it accepted about as fast as it accepts more.

SQLite takes one writer at a time (db.engine.WriterGate). When every writer queued at the gate
alike, the calls' sixteen threads outnumbered the saga's and took most turns: when the load
stopped, most of the orders placed were still PENDING, and under load that lasts the backlog
grows until sagas pass `--saga-timeout-s` and fail their orders. The saga's and the dispatcher's
writers now pass ahead of all but one of the calls' writers, so the calls wait at the gate instead.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from orders_service_api.v1 import orders_pb2 as pb

from tests.support import ServerProcess, wait_until

pytestmark = pytest.mark.e2e

CALLERS = 16
ORDERS = 1_500
SKUS = [f"LOAD-{n}" for n in range(20)]


def _pending(database: Path) -> int:
    with closing(sqlite3.connect(database, timeout=10)) as connection:
        (count,) = connection.execute("SELECT count(*) FROM orders WHERE status = 'PENDING'").fetchone()
    return int(count)


def test_the_saga_keeps_up_with_a_closed_loop_of_place_orders(
    spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = spawn_server()  # the embedded default: ./var/orders.db under its working directory
    database = tmp_path / "var" / "orders.db"
    for sku in SKUS:
        server.stubs.set_stock(sku, 1_000_000)
    placed: list[str] = []
    errors: list[grpc.RpcError] = []
    lock = threading.Lock()

    def caller(n: int) -> None:
        while True:
            with lock:
                if len(placed) + len(errors) >= ORDERS:
                    return
            try:
                order = server.stubs.place(f"load-{n}", [(SKUS[n % len(SKUS)], 1)])
            except grpc.RpcError as error:
                with lock:
                    errors.append(error)
                continue
            with lock:
                placed.append(order.order_id)

    callers = [threading.Thread(target=caller, args=(n,)) for n in range(CALLERS)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(120)
    pending_when_the_load_stopped = _pending(database)

    assert not errors, [error.code() for error in errors[:5]]
    assert len(placed) >= ORDERS
    # One-writer fairness, not a speed: with the calls taking most turns, most were still PENDING.
    assert pending_when_the_load_stopped <= len(placed) // 4, (pending_when_the_load_stopped, len(placed))
    wait_until(lambda: _pending(database) == 0, timeout=60, what="every saga to settle")
    sample = server.stubs.get(placed[-1])
    assert sample.status == pb.ORDER_STATUS_VALIDATED
    assert sum(server.stubs.stock(sku).reserved for sku in SKUS) == len(placed)
