"""CPU of a place transaction in one process, without gRPC: `OrdersUnitOfWork`, `add_order` and
the commit on a fresh PostgreSQL database, against an empty unit of work and the domain's own
part (`Order.place`). This process's CPU time (`time.process_time()`), so that other processes on
a shared machine change the figure little; medians of `--rounds` runs of `--calls` each.

    .venv/bin/python -m bench.transaction_cpu

Run it in two checkouts, alternated, to compare a change to the database layer
(docs/performance.md, "Sixth round").
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

from sqlalchemy import Engine

from bench.server import create_bench_database, database_url, drop_bench_database, migrate
from db.engine import EngineSettings, make_engine
from db.unit_of_work import OrdersUnitOfWork
from domain.model import Order, OrderItem, utcnow

ITEMS = (OrderItem("SKU-1", 1), OrderItem("SKU-2", 2))


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transaction_cpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--calls", type=int, default=2000, help="calls per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each operation, interleaved")
    args = parser.parse_args()
    dbname = create_bench_database()
    try:
        url = database_url(dbname)
        migrate(url)
        engine = make_engine(url, EngineSettings(pool_size=2))
        try:
            report(engine, args.calls, args.rounds)
        finally:
            engine.dispose()
    finally:
        drop_bench_database(dbname)
    return 0


def report(engine: Engine, calls: int, rounds: int) -> None:
    def place() -> None:
        order, placed = Order.place("customer", ITEMS, str(uuid.uuid4()), now=utcnow())
        with OrdersUnitOfWork(engine) as uow:
            uow.add_order(order, "fingerprint", [placed], "correlation")
            uow.commit()

    def empty() -> None:
        with OrdersUnitOfWork(engine) as uow:
            uow.commit()

    def domain() -> None:
        Order.place("customer", ITEMS, str(uuid.uuid4()), now=utcnow())

    operations: dict[str, Callable[[], None]] = {
        "place transaction": place,
        "empty unit of work": empty,
        "Order.place alone": domain,
    }
    for operation in operations.values():  # warm: the pool, prepared statements, caches
        for _ in range(200):
            operation()
    runs: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(rounds):
        for name, operation in operations.items():
            began = time.process_time()
            for _ in range(calls):
                operation()
            runs[name].append((time.process_time() - began) / calls * 1e6)
    for name, values in runs.items():
        each = ", ".join(f"{value:.0f}" for value in values)
        print(f"{name}: median {statistics.median(values):.0f} us of CPU per call (runs: {each})")


if __name__ == "__main__":
    raise SystemExit(main())
