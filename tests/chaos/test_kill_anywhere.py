"""Never lose an order, part 2: kill any instance at any moment, under load.

Three `orders-server` processes dispatch from one PostgreSQL database while client threads place
orders (every one with a `request_id`, retried once on another instance when the call fails in
transit) and cancel some. A controller kills a random instance CHAOS_KILLS times (default 5; the
full run 50) at random moments and restarts it (a new process on the same database):

- `sigkill`: SIGKILL, wherever the process happens to be;
- `crash_after_reserve`: its fault file is switched on and the process kills itself right after a
  saga step reserved stock, before the order is updated (reservation committed, order PENDING);
- `crash_before_complete`: the same, after a handler finished and before its event is marked DONE
  (all effects committed, the event still PENDING under a lease).

One stall per five kills (not a kill): SIGSTOP past the lease, then SIGCONT, so that steps resume
after others took their events over and their completions are fenced ("lease lost").

The file is rewritten to `{}` before the slot restarts. After the load stops, every slot runs
again; once the leases of the dead have expired and nothing is PENDING: DESIGN.md's invariants hold
(stock conserved, no oversell, VALIDATED <=> reserved, every event DONE or DEAD, one reservation
per order and SKU at most), every acknowledged order exists under its request_id and is settled,
every acknowledged cancel stuck, and each order a fault crash interrupted is settled too.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import Engine, select

from db.engine import EngineSettings, make_engine
from db.tables import orders, outbox_events
from tests.chaos.harness import (
    LEASE_S,
    SKUS,
    ClientLoad,
    Cluster,
    Ledger,
    basket,
    env_int,
    fenced_completions,
    migrate,
    verify,
    wait_settled,
)
from tests.invariants import check_invariants, settled
from tests.support import wait_until

KILLS = env_int("CHAOS_KILLS", 5)
SEED = env_int("CHAOS_SEED", 20240612)
CLIENT_THREADS = 4
CANCEL_SHARE = 0.15
FAULTS = ("crash_after_reserve", "crash_before_complete")
CRASHED = re.compile(r"order_id=(?P<order>\S+) fault (?P<fault>crash_\w+): killing the process")

pytestmark = [pytest.mark.chaos, pytest.mark.postgres, pytest.mark.timeout(150 + 15 * KILLS)]


def initial_stock() -> dict[str, int]:
    """A quarter of the SKUs scarce (they run out early: FAILED orders, cancels give stock back),
    a quarter tight, the rest plentiful, so kills land on reservations that succeed and that fail."""
    tiers = (30, 300, 1_000_000, 1_000_000)
    return {sku: tiers[i % len(tiers)] for i, sku in enumerate(SKUS)}


def kill_plan(kills: int, rng: random.Random) -> list[str]:
    """About a fifth of each fault crash (at least one of each from 2 kills on), the rest SIGKILL;
    plus a stall (not a kill) per five kills."""
    each = max(1, round(kills * 0.2)) if kills >= 2 else 0
    plan = [FAULTS[0]] * each + [FAULTS[1]] * each
    plan += ["sigkill"] * (kills - len(plan))
    plan += ["stall"] * max(1, kills // 5)
    rng.shuffle(plan)
    return plan


class Load(ClientLoad):
    """Client threads placing (and sometimes cancelling) orders back to back on live instances."""

    def __init__(self, cluster: Cluster, ledger: Ledger, seed: int) -> None:
        super().__init__(cluster, ledger, CLIENT_THREADS)
        self.seed = seed

    def run(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        later: list[str] = []
        n = 0
        while not self.stop.is_set():
            n += 1
            targets = self.cluster.targets(index + n)
            if not targets:
                self.stop.wait(0.05)
                continue
            order_id = self.ledger.place(targets, f"kill-{index}-{n}", f"customer-{index}", basket(rng))
            if order_id is None:
                self.stop.wait(0.01)  # pace calls refused by a dying instance
                continue
            if rng.random() < CANCEL_SHARE:
                if rng.random() < 0.5:
                    self.ledger.cancel(targets[-1], order_id)  # right away: races the saga
                else:
                    later.append(order_id)
            if len(later) > 5:
                self.ledger.cancel(targets[0], later.pop(0))  # a few orders later: mostly settled

    def acknowledged(self) -> int:
        with self.ledger.lock:
            return len(self.ledger.acknowledged)

    def wait_for_more(self, count: int) -> None:
        floor = self.acknowledged() + count
        wait_until(lambda: self.acknowledged() >= floor, timeout=60, what=f"{count} more acknowledged orders")


def test_killing_any_instance_at_any_moment_loses_no_acknowledged_order(
    make_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    started = time.monotonic()
    url = make_pg_database()
    migrate(url, tmp_path)
    rng = random.Random(SEED)
    stock = initial_stock()
    plan = kill_plan(KILLS, rng)
    kills: Counter[str] = Counter()
    pause = threading.Event()  # never set: random pacing of the controller, not a wait for work

    cluster = Cluster(url, tmp_path, size=3)
    engine = make_engine(url, EngineSettings(pool_size=2, max_overflow=0))
    ledger = Ledger()
    try:
        cluster.start_all()
        for sku, available in stock.items():
            cluster.live()[0].stubs.set_stock(sku, available)

        with Load(cluster, ledger, SEED) as load:
            for kind in plan:
                # Some orders get through between two kills, then the next one comes at random.
                load.wait_for_more(20)
                pause.wait(rng.uniform(0.0, 1.5))
                slot = rng.choice(cluster.running())
                kills[kind] += 1
                if kind == "stall":
                    cluster.stall(slot, LEASE_S + rng.uniform(0.5, 1.5))
                    continue
                if kind == "sigkill":
                    cluster.kill(slot)
                else:
                    cluster.crash_at(slot, kind)
                pause.wait(rng.uniform(0.0, 1.0))  # the cluster runs one short for a moment
                cluster.start(slot)
            load.wait_for_more(20)  # and some after the last restart
        load_s = time.monotonic() - started

        # Every slot runs again (restarted above); all are alive and nothing stays PENDING once
        # the leases of the killed processes have expired.
        for slot in set(range(3)) - set(cluster.running()):
            cluster.start(slot)
        for process in cluster.live():
            assert process.proc.poll() is None, process.log()[-3000:]
        wait_settled(cluster, engine, timeout=60 + 5 * LEASE_S)
        settle_s = time.monotonic() - started - load_s
    finally:
        cluster.stop_all()
        engine.dispose()

    summary, statuses = verify(url, stock, ledger)
    engine = make_engine(url, EngineSettings(pool_size=2, max_overflow=0))
    try:
        crashed, crashes = crashed_orders(cluster.logs)
        with engine.connect() as connection:
            crashed_status = dict(
                connection.execute(
                    select(orders.c.id, orders.c.status).where(orders.c.id.in_(list(crashed)))
                ).all()
            )
    finally:
        engine.dispose()
    fenced = fenced_completions(cluster.logs)
    killed = sum(n for kind, n in kills.items() if kind != "stall")
    print(
        f"\nkill-anywhere: placed={len(ledger.requested)} acknowledged={len(ledger.acknowledged)} "
        f"kills={killed} {dict(kills)} fenced={fenced} time={time.monotonic() - started:.1f}s "
        f"(until the load stopped {load_s:.1f}s, settle {settle_s:.1f}s) retried={ledger.retries} "
        f"(ok on retry {ledger.retried_ok}) cancels={ledger.cancel_requested} (ok {len(ledger.cancelled)}) "
        f"statuses={dict(statuses)} events={dict(summary.events_by_status)} "
        f"crashed_steps={dict(Counter(crashed.values()))} place_codes={dict(ledger.place_codes)} "
        f"cancel_codes={dict(ledger.cancel_codes)}"
    )
    assert kills == Counter(plan)
    # Each fault crash happened in a saga step of a known order, which ended settled all the same.
    for fault in FAULTS:
        assert crashes[fault] == kills[fault], (crashes, kills)
    unsettled = {o: s for o, s in crashed_status.items() if s not in ("VALIDATED", "FAILED", "CANCELLED")}
    assert not unsettled and set(crashed_status) == set(crashed), (crashed, crashed_status)
    assert statuses["VALIDATED"] and statuses["FAILED"], statuses


def crashed_orders(logs: list[Path]) -> tuple[dict[str, str], Counter[str]]:
    """(order id -> fault, fault -> processes it killed), from the line a fault crash logs just
    before os._exit (several saga workers of the process may reach the point at once)."""
    found: dict[str, str] = {}
    processes: Counter[str] = Counter()
    for path in logs:
        faults = set()
        for match in CRASHED.finditer(path.read_text(errors="replace")):
            found[match["order"]] = match["fault"]
            faults.add(match["fault"])
        processes.update(faults)
    return found, processes


@pytest.mark.parametrize("ending", ["crash_after_reserve", "breaker_open"])
def test_a_stale_saga_step_leaves_no_reservation_behind(
    make_pg_database: Callable[[], str], tmp_path: Path, ending: str
) -> None:
    """Instance A claims ORDER_CREATED and its inventory call hangs past the lease (A has one saga
    worker, so it cannot claim the event again itself). The client cancels the order. Instance B
    takes the event over: order not PENDING, nothing to release, DONE; ORDER_CANCELLED, DONE. Then
    A's stale step makes its reserve call, and either dies right there (`crash_after_reserve`) or,
    the slow call having opened the breaker (`breaker_open`), ends with a verdict that is fenced and
    dropped: by the inventory's fence, B's step of the order being newer ("passed to another step"),
    or by the lease token ("lease lost"). A's dispatcher renews no lease meanwhile
    (`lease_renewal_off`): the hang stands for the whole process stalling."""
    url = make_pg_database()
    migrate(url, tmp_path)
    cluster = Cluster(url, tmp_path, size=2)
    engine = make_engine(url, EngineSettings(pool_size=2, max_overflow=0))
    sku, hang_s = "STALE-SKU", LEASE_S + 4
    try:
        extra = ["--saga-workers", "1"] + (["--breaker-fail-max", "1"] if ending == "breaker_open" else [])
        a = cluster.start(0, extra)
        a.stubs.set_stock(sku, 10)
        faults: dict[str, object] = {"inventory_delay_s": hang_s, "lease_renewal_off": True}
        if ending == "crash_after_reserve":
            faults[ending] = True
        cluster.write_fault(0, faults)
        order = a.stubs.place("stale", [(sku, 2)], request_id="stale-1")
        wait_until(lambda: "lease" in event_states(engine), what="A to claim ORDER_CREATED")
        a.stubs.orders.CancelOrder(pb.CancelOrderRequest(order_id=order.order_id), timeout=10)
        cluster.start(1)
        wait_until(lambda: event_states(engine) == ["DONE", "DONE"], timeout=hang_s, what="B to settle")
        assert "stock reserved" not in a.log() and a.proc.poll() is None, "A was not stale yet"
        if ending == "crash_after_reserve":
            wait_until(lambda: a.proc.poll() is not None, timeout=2 * hang_s, what="A's crash")
        else:
            wait_until(
                lambda: "lease lost" in a.log() or "passed to another step" in a.log(),
                timeout=2 * hang_s,
                what="A's fenced verdict",
            )
        assert settled(engine)
    finally:
        cluster.stop_all()
        engine.dispose()
    check_invariants(url, url, {sku: 10})


def event_states(engine: Engine) -> list[str]:
    """Status of each outbox event in id order, "lease" for a PENDING one under a live lease."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(outbox_events.c.status, outbox_events.c.lease_token).order_by(outbox_events.c.id)
        ).all()
    return ["lease" if row.status == "PENDING" and row.lease_token else row.status for row in rows]
