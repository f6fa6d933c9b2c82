"""Never lose an order, part 4: saga steps that stall past their lease, at every step boundary.

Three `orders-server` processes dispatch from one PostgreSQL database. Every slot's fault file
stalls a saga step with probability STALL_PROBABILITY for 1.5 leases at each step boundary
(before_reserve, after_reserve, before_release, after_release), and turns lease renewal off, so a
stalled step stands for its whole process stalling (a pause of the machine, a lost connection):
its lease runs out, another step takes the event over, and the stalled one resumes stale. A
saga timeout of a few leases makes old sagas give up (and the housekeeping sweep fail them), so
the give-up boundary is crossed too: the stale give-up that released a VALIDATED order's stock
is one of the two oversell paths of issue 15.

Client threads place CHAOS_STALL_ORDERS orders (default 100, or CHAOS_ORDERS / 10) at a steady
pace on a few SKUs whose stock runs out, and cancel some (some right away, racing the saga; some
a few orders later). Then the faults are cleared, and once nothing is PENDING: DESIGN.md's
invariants hold, every acknowledged order and cancel is honoured, and the logs show that stale
steps really happened (stalls at each boundary of the happy path, and at least one write refused
by a fence: "lease lost to another dispatcher" in the dispatcher or "passed to another step; this
one wrote nothing" in the saga).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from db.engine import EngineSettings, make_engine
from db.tables import orders
from tests.chaos.harness import (
    FENCED,
    LEASE_S,
    SKUS,
    STALLED,
    SUPERSEDED,
    Cluster,
    Ledger,
    count_lines,
    env_int,
    migrate,
    verify,
    wait_settled,
)

# `make chaos` sets CHAOS_ORDERS=3000 for the other runs: this one then places 300 (about 40 s of load).
ORDERS = env_int("CHAOS_STALL_ORDERS", env_int("CHAOS_ORDERS", 1000) // 10)
SEED = env_int("CHAOS_SEED", 20240613)
CLIENT_THREADS = 4
# Between two orders of a client thread: about 7 orders/s in all, what 3 x SAGA_WORKERS saga
# workers keep up with while most of their time goes in stalls; faster, a backlog builds up and
# most sagas time out before they reserve anything.
PLACE_INTERVAL_S = 0.5
SAGA_WORKERS = 8  # per instance; a stalled worker sleeps, holding no connection
CANCEL_SHARE = 0.15
STALL_PROBABILITY = 0.25
STALL_S = 1.5 * LEASE_S
SAGA_TIMEOUT_S = 3 * LEASE_S  # outlived by a saga stalled past its lease twice or three times
CONTENDED = SKUS[:5]
STOCK_EACH = max(ORDERS * 2 // 5, 10)  # about half of what the orders ask for (0.8 units an order)

pytestmark = [pytest.mark.chaos, pytest.mark.postgres, pytest.mark.timeout(90 + ORDERS // 5)]


def basket(rng: random.Random) -> list[tuple[str, int]]:
    """1-3 distinct contended SKUs, 1-3 of each."""
    return [(sku, rng.randint(1, 3)) for sku in sorted(rng.sample(CONTENDED, rng.randint(1, 3)))]


def place_orders(cluster: Cluster, ledger: Ledger, index: int, count: int, pace: threading.Event) -> None:
    """One client thread: `count` orders at a steady pace, on live instances in turn; cancels some."""
    rng = random.Random(SEED * 100 + index)
    later: list[str] = []
    for n in range(count):
        targets = cluster.targets(index + n)
        order_id = ledger.place(targets, f"stall-{index}-{n}", f"customer-{index}", basket(rng))
        if order_id is not None and rng.random() < CANCEL_SHARE:
            if rng.random() < 0.5:
                ledger.cancel(targets[-1], order_id)  # right away: races the saga
            else:
                later.append(order_id)
        if len(later) > 3:
            ledger.cancel(targets[0], later.pop(0))  # a few orders later
        pace.wait(PLACE_INTERVAL_S)  # never set: the client's pace, not a wait for work
    for order_id in later:
        ledger.cancel(cluster.targets(index)[0], order_id)


def failure_reasons(engine: Engine) -> Counter[str]:
    """How many orders FAILED for each reason (out of stock, the saga timed out, gave up)."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(orders.c.failure_reason, func.count())
            .where(orders.c.status == "FAILED")
            .group_by(orders.c.failure_reason)
        ).all()
    reasons: Counter[str] = Counter()
    for reason, count in rows:
        reasons[str(reason).split(" for SKU")[0]] += int(count)  # one line for every SKU out of stock
    return reasons


def test_saga_steps_stalled_past_their_lease_change_nothing_once_taken_over(
    make_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    started = time.monotonic()
    url = make_pg_database()
    migrate(url, tmp_path)
    stock = dict.fromkeys(CONTENDED, STOCK_EACH)
    stalls: dict[str, object] = {
        "stall_probability": STALL_PROBABILITY,
        "stall_s": STALL_S,
        "lease_renewal_off": True,
    }
    extra = [
        "--saga-workers",
        str(SAGA_WORKERS),
        "--saga-timeout-s",
        str(SAGA_TIMEOUT_S),
        "--housekeeping-interval-s",
        "1",
    ]

    cluster = Cluster(url, tmp_path, size=3)
    engine = make_engine(url, EngineSettings(pool_size=2, max_overflow=0))
    ledger = Ledger()
    pace = threading.Event()
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda slot: cluster.start(slot, extra), range(3)))
        for sku, available in stock.items():
            cluster.live()[0].stubs.set_stock(sku, available)
        for slot in range(3):
            cluster.write_fault(slot, stalls)

        per_thread = -(-ORDERS // CLIENT_THREADS)
        with ThreadPoolExecutor(CLIENT_THREADS) as clients:
            runs = [
                clients.submit(place_orders, cluster, ledger, index, per_thread, pace)
                for index in range(CLIENT_THREADS)
            ]
            for run in runs:
                run.result(timeout=60 + per_thread * PLACE_INTERVAL_S)
        load_s = time.monotonic() - started

        for slot in range(3):
            cluster.write_fault(slot, {})
        # Steps stalled right now finish their stall; then every lease left behind runs out.
        wait_settled(cluster, engine, timeout=30 + 2 * STALL_S)
        settle_s = time.monotonic() - started - load_s
        reasons = failure_reasons(engine)
    finally:
        cluster.stop_all()
        engine.dispose()

    summary, statuses = verify(url, stock, ledger)
    text = "".join(path.read_text(errors="replace") for path in cluster.logs)
    boundaries = Counter(match["boundary"] for match in STALLED.finditer(text))
    fenced = count_lines(cluster.logs, FENCED)
    superseded = count_lines(cluster.logs, SUPERSEDED)
    gave_up = text.count("giving up on order")
    print(
        f"\nstalls-past-the-lease: placed={len(ledger.requested)} acknowledged={len(ledger.acknowledged)} "
        f"cancels={ledger.cancel_requested} (ok {len(ledger.cancelled)}) stalls={dict(boundaries)} "
        f"fenced={fenced} superseded={superseded} gave_up={gave_up} "
        f"handed_back={text.count('its lease ran out before it started')} "
        f"statuses={dict(statuses)} reasons={dict(reasons)} events={dict(summary.events_by_status)} "
        f"place_codes={dict(ledger.place_codes)} cancel_codes={dict(ledger.cancel_codes)} "
        f"time={time.monotonic() - started:.1f}s (load {load_s:.1f}s, settle {settle_s:.1f}s)"
    )
    assert len(ledger.acknowledged) == len(ledger.requested), ledger.place_codes
    happy_path = {"before_reserve", "after_reserve"}
    assert happy_path <= boundaries.keys(), f"no stall at {sorted(happy_path - boundaries.keys())}"
    assert fenced + superseded >= 1, "no stale step was fenced: the run proved nothing"
    assert statuses["VALIDATED"] and statuses["FAILED"], statuses
