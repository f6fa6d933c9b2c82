"""Never lose an order, part 1: three `orders-server` processes on one PostgreSQL database.

All three take orders and all three dispatch the outbox (short leases, quick polls), so they race
for the same events all the time: `FOR UPDATE SKIP LOCKED` claims, fenced completions (a process
whose lease ran out while its step was slow finds the event taken over: "lease lost to another
dispatcher"), per-order event ordering between ORDER_CREATED and ORDER_CANCELLED.

Sixteen client threads spread CHAOS_ORDERS orders (default 1000; the full run a few thousand) over
the three instances, 1-3 lines over 20 SKUs whose stock runs out at different times, and cancel
some of them, some right away (a race with the saga) and some later. Then, once nothing is
PENDING: DESIGN.md's invariants hold, every acknowledged order is stored and settled, every
acknowledged cancel stuck, and nothing was reserved twice.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from db.engine import EngineSettings, make_engine
from tests.chaos.harness import (
    LEASE_S,
    SKUS,
    Cluster,
    Ledger,
    basket,
    env_int,
    fenced_completions,
    migrate,
    verify,
    wait_settled,
)

ORDERS = env_int("CHAOS_ORDERS", 1000)
CLIENT_THREADS = 16
CANCEL_SHARE = 0.12
SEED = env_int("CHAOS_SEED", 20240611)

pytestmark = [pytest.mark.chaos, pytest.mark.postgres, pytest.mark.timeout(120 + ORDERS // 10)]


def initial_stock(orders: int, rng: random.Random) -> dict[str, int]:
    """About 0.2 * orders units of each SKU are asked for; stock of 20-80% of that runs out early or
    late, so orders both succeed and fail (and cancels give stock back to later ones)."""
    demand = max(orders // 5, 10)
    return {sku: rng.randint(demand // 5, demand * 4 // 5) for sku in SKUS}


def test_three_dispatching_instances_settle_every_order_exactly_once(
    make_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    started = time.monotonic()
    url = make_pg_database()
    migrate(url, tmp_path)
    rng = random.Random(SEED)
    stock = initial_stock(ORDERS, rng)
    baskets = [basket(rng) for _ in range(ORDERS)]
    # Cancel right after the OK (racing the saga) or after a few more orders (mostly settled by then).
    cancels = {i: rng.random() < 0.5 for i in range(ORDERS) if rng.random() < CANCEL_SHARE}

    cluster = Cluster(url, tmp_path, size=3)
    engine = make_engine(url, EngineSettings(pool_size=2, max_overflow=0))
    try:
        cluster.start_all()
        first = cluster.live()[0].stubs
        for sku, available in stock.items():
            first.set_stock(sku, available)
        ledger = Ledger()
        late: list[str] = []
        late_lock = threading.Lock()

        def client(index: int) -> None:
            targets = cluster.targets(index)
            order_id = ledger.place(targets, f"many-{index}", f"customer-{index % 97}", baskets[index])
            if order_id is None or index not in cancels:
                return
            if cancels[index]:
                ledger.cancel(targets[-1], order_id)  # another instance than the one that placed it
                return
            with late_lock:
                late.append(order_id)
                due = late.pop(0) if len(late) > 8 else None
            if due is not None:
                ledger.cancel(targets[0], due)

        load_started = time.monotonic()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            list(pool.map(client, range(ORDERS)))
        for order_id in late:
            ledger.cancel(cluster.targets(0)[0], order_id)
        load_s = time.monotonic() - load_started

        wait_settled(cluster, engine, timeout=30 + 4 * LEASE_S)
        settle_s = time.monotonic() - load_started - load_s
    finally:
        cluster.stop_all()
        engine.dispose()

    summary, statuses = verify(url, stock, ledger)
    fenced = fenced_completions(cluster.logs)
    print(
        f"\nmany-instances: orders={ORDERS} acknowledged={len(ledger.acknowledged)} "
        f"retried={ledger.retries} cancels={ledger.cancel_requested} (ok {len(ledger.cancelled)}) "
        f"statuses={dict(statuses)} events={dict(summary.events_by_status)} fenced={fenced} "
        f"place_codes={dict(ledger.place_codes)} cancel_codes={dict(ledger.cancel_codes)} "
        f"load={load_s:.1f}s ({ORDERS / load_s:.0f}/s) settle={settle_s:.1f}s "
        f"total={time.monotonic() - started:.1f}s"
    )
    # Nothing was killed: every order is acknowledged, and a cancel is refused only when it came
    # too late (the order had already FAILED).
    assert len(ledger.acknowledged) == ORDERS, dict(ledger.place_codes)
    assert set(ledger.cancel_codes) <= {"OK", "FAILED_PRECONDITION"}, dict(ledger.cancel_codes)
    assert sum(statuses.values()) == ORDERS
    assert statuses["VALIDATED"] and statuses["FAILED"] and statuses["CANCELLED"], statuses
