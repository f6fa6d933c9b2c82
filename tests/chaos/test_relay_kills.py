"""Exactly once in effect: relaying instances killed while they publish, many times.

Three `orders-server` processes on one PostgreSQL database relay to one JetStream stream while
client threads place orders (and cancel some). A controller kills a random instance CHAOS_RELAY_KILLS
times (default 4; `make chaos` 40) and restarts it:

- `sigkill`: SIGKILL once the stream has grown since the last kill, so the relay is publishing;
- `crash_after_publish`: the fault file makes the process kill itself right after JetStream
  acknowledged a publish and before the event is DONE, the exact moment the issue names.

Each dead relay's leased events wait out their lease (2 s), then another instance publishes them
again; JetStream must drop those second messages (`Nats-Msg-Id`). Once the load stops and every
slot runs again, a reader of the whole stream (what any consumer could be sent) counts each
order's events: for every order in the database, one message per version from 1 to its last, none
missing, none twice, in version order, and the kinds as its history says; every acknowledged order
is there. The rows agree: every relay event DONE, and some were claimed again after a kill.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.engine import EngineSettings, make_engine
from db.tables import orders, relay_events
from tests.chaos.harness import (
    SKUS,
    ClientLoad,
    Cluster,
    Ledger,
    basket,
    env_int,
    migrate,
    verify,
    wait_settled,
)
from tests.events_support import EventStream, by_order
from tests.support import wait_until

KILLS = env_int("CHAOS_RELAY_KILLS", 4)
SEED = env_int("CHAOS_SEED", 20261207)
CLIENT_THREADS = 3
CANCEL_SHARE = 0.2

pytestmark = [pytest.mark.chaos, pytest.mark.postgres, pytest.mark.timeout(120 + 10 * KILLS)]


class Load(ClientLoad):
    """Client threads placing orders back to back on live instances, cancelling some."""

    def run(self, index: int) -> None:
        rng = random.Random(SEED * 10 + index)
        n = 0
        while not self.stop.is_set():
            n += 1
            targets = self.cluster.targets(index + n)
            if not targets:
                self.stop.wait(0.05)
                continue
            order_id = self.ledger.place(targets, f"relay-{index}-{n}", f"customer-{index}", basket(rng))
            if order_id is None:
                self.stop.wait(0.01)
            elif rng.random() < CANCEL_SHARE:
                self.ledger.cancel(targets[-1], order_id)
            self.stop.wait(0.005)  # a steady flow, not a flood: the kills are the point


def expected_history(status: str, version: int, reason: str) -> list[str]:
    """The kinds an order's events must have, from its final row."""
    if version == 1:
        return ["placed"]
    if status == "CANCELLED":
        return ["placed", "cancelled"] if version == 2 else ["placed", "validated", "cancelled"]
    if status == "VALIDATED":
        return ["placed", "validated"]
    return ["placed", "expired" if reason == "saga timed out" else "failed"]


def test_relays_killed_while_publishing_lose_no_event_and_duplicate_none(
    make_pg_database: Callable[[], str], nats_url: str, tmp_path: Path
) -> None:
    url = make_pg_database()
    migrate(url, tmp_path)
    stream = EventStream.fresh(nats_url)
    extra = [*stream.server_args(), "--events-workers", "8"]
    rng = random.Random(SEED)
    plan = ["crash_after_publish" if k % 2 else "sigkill" for k in range(KILLS)]
    rng.shuffle(plan)
    kills: Counter[str] = Counter()
    stock = {sku: 1_000_000 for sku in SKUS}
    cluster = Cluster(url, tmp_path, size=3)
    ledger = Ledger()
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda slot: cluster.start(slot, extra), range(3)))
        stubs = cluster.live()[0].stubs
        for sku, quantity in stock.items():
            stubs.set_stock(sku, quantity)
        with Load(cluster, ledger, CLIENT_THREADS):
            for how in plan:
                seen = stream.count()

                def grown(seen: int = seen) -> bool:
                    return stream.count() > seen + 5

                wait_until(grown, timeout=30, what="publishing")
                slot = rng.choice(cluster.running())
                if how == "sigkill":
                    cluster.kill(slot)
                else:
                    cluster.crash_at(slot, "crash_after_publish")
                kills[how] += 1
                cluster.start(slot, extra)
            time.sleep(0.5)  # a last stretch of load with every instance up: paced, nothing awaited
        wait_settled(cluster, make_engine(url, EngineSettings(pool_size=1, max_overflow=0)), timeout=60)
        engine = make_engine(url, EngineSettings(pool_size=2, max_overflow=0))
        try:

            def relay_pending() -> bool:
                with engine.connect() as c:
                    left = c.execute(
                        select(func.count()).select_from(relay_events).where(relay_events.c.status != "DONE")
                    ).scalar_one()
                return left == 0

            wait_until(relay_pending, timeout=60, interval=0.25, what="every relay event DONE")
            with engine.connect() as c:
                final = c.execute(
                    select(orders.c.id, orders.c.status, orders.c.version, orders.c.failure_reason)
                ).all()
                reclaimed = c.execute(
                    select(func.count()).select_from(relay_events).where(relay_events.c.claims > 1)
                ).scalar_one()
        finally:
            engine.dispose()
    finally:
        cluster.stop_all()

    messages = stream.read()
    stream.delete()
    summary, statuses = verify(url, stock, ledger)
    ids = Counter(m.headers["Nats-Msg-Id"] for m in messages)
    twice = [event_id for event_id, count in ids.items() if count > 1]
    grouped = by_order(messages)
    problems: list[str] = [f"event {event_id} reached the stream twice" for event_id in twice]
    for row in final:
        got = grouped.get(row.id, [])
        versions = [m.event.version for m in got]
        if versions != list(range(1, row.version + 1)):
            problems.append(
                f"order {row.id} ({row.status} v{row.version}): versions {versions} in the stream"
            )
        elif [m.kind for m in got] != expected_history(row.status, row.version, row.failure_reason):
            problems.append(f"order {row.id} ({row.status}): kinds {[m.kind for m in got]}")
    strangers = set(grouped) - {row.id for row in final}
    problems += [f"events of an order the database does not have: {order_id}" for order_id in strangers]
    print(
        f"\n{KILLS} kills ({dict(kills)}), {len(final)} orders {dict(statuses)}, {len(messages)} messages, "
        f"{reclaimed} relay events claimed again after a kill"
    )
    assert not problems, f"{len(problems)} problem(s):\n  " + "\n  ".join(problems[:30])
    assert len(messages) == sum(row.version for row in final)
    assert set(ledger.acknowledged.values()) <= set(grouped)
    assert reclaimed >= kills["crash_after_publish"], (
        "each crash after a publish leaves an event to publish again"
    )
    assert summary.events_by_status.get("PENDING", 0) == 0
