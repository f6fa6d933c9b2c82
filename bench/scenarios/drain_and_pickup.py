"""The relay: drain and pickup, ours and pgqueuer's (bench/relay.py holds the processes), and the
pairing of each job's enqueue with its handler's start."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import event_relay, load, relay
from bench.plan import PICKUP_RATE, RELAY_IN_FLIGHT, SKUS
from bench.server import (
    create_bench_database,
    database_url,
    drop_bench_database,
    migrate,
    pending_events,
    postgres_server,
)

# What "handler start" is in the server's JSON log (saga/dispatcher.py, DEBUG).
HANDLING = "handling ORDER_CREATED event "


def run_relay(plan: dict[str, Any], workdir: Path, server_args: list[str]) -> dict[str, Any]:
    """Drain and pickup, ours and pgqueuer's. Both queues live in one fresh database, filled before
    either consumer starts; each consumer drains its own queue alone."""
    out: dict[str, Any] = {}
    events, seconds = plan["drain_events"], plan["pickup_s"]
    dbname = create_bench_database()
    try:
        url = database_url(dbname)
        migrate(url)
        relay.insert_pending(url, events)
        relay.pgq_prepare(dbname, events)
        (out["drain"],) = relay.in_processes((relay.our_drain, url, events, RELAY_IN_FLIGHT))
        print(f"  our drain: {out['drain']}", flush=True)
        # The event relay beside it: the same dispatcher, each event published to JetStream.
        (out["events_drain"],) = relay.in_processes((event_relay.nats_drain, url, events, RELAY_IN_FLIGHT))
        print(f"  our event relay's drain to NATS JetStream: {out['events_drain']}", flush=True)
        (out["pgqueuer_drain"],) = relay.in_processes((relay.pgq_drain, dbname, events, RELAY_IN_FLIGHT))
        print(f"  pgqueuer drain: {out['pgqueuer_drain']}", flush=True)
        out["pgqueuer_pickup"] = pgqueuer_pickup(dbname, seconds, plan["pickup_wait_s"])
        print(f"  pgqueuer pickup: {out['pgqueuer_pickup']}", flush=True)
    finally:
        drop_bench_database(dbname)
    out["pickup"] = our_pickup(workdir, server_args, seconds, plan["pickup_wait_s"])
    print(f"  our pickup: {out['pickup']}", flush=True)
    return out


def pgqueuer_pickup(dbname: str, seconds: float, wait_s: float) -> dict[str, Any]:
    """A pgqueuer consumer and a paced producer in two processes; the consumer gets the start-up
    time before the first job, and `wait_s` after the last for the stragglers."""
    start_at = time.time() + relay.STARTUP_S
    expected = int(PICKUP_RATE * seconds)
    consumer, sent = relay.in_processes(
        (relay.pgq_consume, dbname, expected, RELAY_IN_FLIGHT, start_at + seconds + wait_s),
        (relay.pgq_produce, dbname, PICKUP_RATE, seconds, start_at),
    )
    row = pickup(sent, consumer["started"], PICKUP_RATE, seconds)
    row["consumer_ready_in_time"] = consumer["ready_at"] < start_at
    row["settings"] = relay.pgq_settings(RELAY_IN_FLIGHT)
    return row


def our_pickup(workdir: Path, server_args: list[str], seconds: float, wait_s: float) -> dict[str, Any]:
    """PlaceOrder at a steady rate, each call tagged with its own correlation id; the server's
    DEBUG JSON log says when the saga handler of that order's event started. The saga runs as many
    handlers at once as pgqueuer's consumer does."""
    args = [*server_args, "--log-format", "json", "--log-level", "DEBUG"]
    args += ["--saga-workers", str(RELAY_IN_FLIGHT)]
    with postgres_server(workdir, "pickup", args) as (server, dbname):
        start_at = time.time() + relay.STARTUP_S
        (sent,) = relay.in_processes(
            (relay.paced_place, server.address, PICKUP_RATE, seconds, start_at, SKUS)
        )
        deadline = time.monotonic() + wait_s
        started = handler_starts(server.log())
        while len(started) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.25)
            started = handler_starts(server.log())
        row = pickup(sent, started, PICKUP_RATE, seconds)
        row["pending_after"] = pending_events(dbname)
        row["server_log_errors"] = server.log_errors()
        row["server_exit"] = server.stop()
    return row


def handler_starts(log_text: str) -> dict[str, float]:
    """Saga handler start times (epoch seconds) by correlation id, from the server's JSON log."""
    starts: dict[str, float] = {}
    for line in log_text.splitlines():
        if HANDLING not in line or not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("message", "").startswith(HANDLING):
            starts[entry["correlation_id"]] = datetime.fromisoformat(entry["time"]).timestamp()
    return starts


def pickup(sent: dict[str, float], started: dict[str, float], rate: float, duration: float) -> dict[str, Any]:
    """Percentiles of handler start minus enqueue start over every job sent; a job whose handler
    was not seen to start counts as slower than all (its percentile is then None)."""
    delays = sorted(started[key] - t if key in started else math.inf for key, t in sent.items())

    def ms(q: float) -> float | None:
        value = load.percentile(delays, q)
        return round(value * 1000, 1) if math.isfinite(value) else None

    return {
        "rate_per_s": rate,
        "duration_s": duration,
        "sent": len(sent),
        "paired": sum(1 for key in sent if key in started),
        "p50_ms": ms(0.50),
        "p95_ms": ms(0.95),
        "p99_ms": ms(0.99),
        "max_ms": ms(1.0),
    }
