"""CPU of the inventory saga's handlers per order in one process, without gRPC or the dispatcher:
orders placed on a fresh database, their ORDER_CREATED events claimed `--batch` at a time and run
through the set-based handler (`InventorySaga.on_orders_created`) or one by one
(`on_order_created`), alternated claim by claim. This process's CPU time (`time.process_time()`),
so that other processes on a shared machine change the figure little.

    .venv/bin/python -m bench.saga_cpu --backend sqlite --batch 16

What it leaves out is what the saga costs a server beyond its handlers: the dispatcher's rounds,
the worker threads and their share of the interpreter lock (docs/performance.md, "Seventh round").
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

from sqlalchemy import Engine

from bench.server import create_bench_database, database_url, drop_bench_database, migrate
from db.engine import make_engine
from db.inventory import InventoryUnitOfWork
from db.unit_of_work import OrdersUnitOfWork
from domain.model import Order, OrderItem, utcnow
from saga.inventory import InventoryParticipant, InventorySaga, SagaSettings
from saga.resilience import ConcurrentCircuitBreaker, Guard, RateLimiter

SKUS = [f"SKU-{n:04d}" for n in range(200)]


def place(engine: Engine, count: int) -> None:
    """`count` orders of 1-3 items of `SKUS`, each in its own transaction, as PlaceOrder writes them."""
    rng = random.Random(1)
    for n in range(count):
        skus = sorted(rng.sample(SKUS, rng.randint(1, 3)))
        order, placed = Order.place(f"customer-{n}", tuple(OrderItem(s, rng.randint(1, 3)) for s in skus))
        with OrdersUnitOfWork(engine) as uow:
            uow.add_order(order, None, [placed], f"corr-{n}")
            uow.commit()


def measure(engine: Engine, orders: int, batch: int) -> dict[str, float]:
    """Microseconds of CPU per order, for the set-based and the one-by-one handler."""
    with InventoryUnitOfWork(engine) as uow:
        for sku in SKUS:
            uow.stock.set_available(sku, 10**9, utcnow())
        uow.commit()
    place(engine, orders)
    breaker = ConcurrentCircuitBreaker(slow_call_s=60.0, fail_max=5, reset_timeout=1.0, name="bench")
    saga = InventorySaga(
        partial(OrdersUnitOfWork, engine),
        InventoryParticipant(partial(InventoryUnitOfWork, engine)),
        Guard(breaker, RateLimiter("1000000/second")),
        SagaSettings(),
        batching=True,
    )
    spent = {"set-based": 0.0, "one by one": 0.0}
    counted = {"set-based": 0, "one by one": 0}
    for turn in range(orders // batch):
        with OrdersUnitOfWork(engine) as uow:
            events = uow.outbox.claim(batch, timedelta(seconds=60), utcnow())
            uow.commit()
        way = "set-based" if turn % 2 == 0 else "one by one"
        started = time.process_time()
        if way == "set-based":
            verdicts = saga.on_orders_created(events)
            if len(verdicts) != len(events):
                raise RuntimeError(f"the batch handler answered {len(verdicts)} of {len(events)} events")
        else:
            for event in events:
                saga.on_order_created(event)
        spent[way] += time.process_time() - started
        counted[way] += len(events)
    return {way: 1e6 * spent[way] / max(counted[way], 1) for way in spent}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.saga_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16, help="events per claim (the dispatcher's round)")
    args = parser.parse_args()
    dbname = ""
    with tempfile.TemporaryDirectory(prefix="saga-cpu-") as tmp:
        if args.backend == "sqlite":
            url = f"sqlite:///{Path(tmp) / 'orders.db'}"
        else:
            dbname = create_bench_database()
            url = database_url(dbname)
        try:
            migrate(url)
            engine = make_engine(url)
            try:
                figures = measure(engine, args.orders, args.batch)
            finally:
                engine.dispose()
        finally:
            if dbname:
                drop_bench_database(dbname)
    cells = ", ".join(f"{way} {us:.0f} us" for way, us in figures.items())
    print(f"{args.backend}, batches of {args.batch}: CPU per order: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
