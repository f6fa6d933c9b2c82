"""The paragraphs under the tables: CPU, latency at half the peak, what the relay and the soak did."""

from __future__ import annotations

import os
from typing import Any

from bench.plan import PICKUP_RATE


def cpu_text(used: dict[str, Any]) -> str:
    """A `cpu.CpuWindow` result in words."""
    return (
        f"server process {used['server_cores']} cores (its threads share one), PostgreSQL "
        f"{used['postgresql_cores']}, the machine {used['machine_busy_cores']} of {os.cpu_count()}"
    )


def flow_cpu_notes(pg: dict[str, Any]) -> list[str]:
    """CPU per completed flow (place, saga, WatchOrder to terminal): the server's, PostgreSQL's and
    the machine's, against what pgbench's place-plus-saga transaction costs the machine."""
    flow = pg.get("flow") or {}
    used, rate = flow.get("cpu") or {}, flow.get("per_s") or 0
    if not used or not rate:
        return []
    tps = ((pg.get("pgbench") or {}).get("place_saga") or {}).get("tps")
    text = (
        f"CPU during flow: {cpu_text(used)}; per completed flow "
        f"{used['server_cores'] / rate * 1000:.1f} ms of server CPU, "
        f"{used['postgresql_cores'] / rate * 1000:.1f} ms of PostgreSQL's and "
        f"{used['machine_busy_cores'] / rate * 1000:.1f} ms of the machine's"
    )
    if tps:
        cores = os.cpu_count() or 1
        text += f" (pgbench: {cores / tps * 1000:.1f} ms of the machine's per place-plus-saga at full load)"
    return [text + "."]


def half_peak_notes(pg: dict[str, Any]) -> list[str]:
    """Where PlaceOrder's time goes at half the peak: inside the server or outside it, and how busy
    the one core of the server process (its threads share the GIL) and the machine were."""
    notes = []
    for key, what in (("place_half", "with the saga"), ("place_half_saga_off", "saga off")):
        row = pg.get(key) or {}
        if not row:
            continue
        inside, used = row.get("in_server") or {}, row.get("cpu") or {}
        text = (
            f"PlaceOrder at half the peak, {what}: p99 {row['p99_ms']:.1f} ms at the client, "
            f"{inside.get('p99_ms')} ms inside the server (interceptor to reply, histogram buckets)"
        )
        if used:
            text += f"; CPU: {cpu_text(used)}"
        notes.append(text + ".")
    return notes


def bare_stack_notes(bare: dict[str, Any]) -> list[str]:
    """What the bare stack is, the rows it inserted, its CPU at its peak and at PlaceOrder's half-peak
    rate."""
    if not bare:
        return []
    text = (
        "Bare stack: `python -m bench.bare_stack` (bench/bare_stack.py), one process of the same grpcio and "
        "channel options as `orders-server`, 16 handler threads, no interceptors, pinned to one CPU as "
        "`orders-server --cpu-affinity auto` (the default) pins itself; PlaceOrder runs one "
        "psycopg2 `INSERT ... RETURNING` and `COMMIT` on its thread's connection, driven by the same "
        f"client processes and operation as place; {bare.get('rows')} rows inserted"
    )
    for key, what in (("peak", "at its peak"), ("half", "at place's half-peak rate")):
        row = bare.get(key) or {}
        used, rate = row.get("cpu") or {}, row.get("per_s")
        if used and rate:
            text += (
                f"; CPU {what}: {cpu_text(used)}, {used['server_cores'] / rate * 1000:.2f} ms of server "
                "CPU per call"
            )
    return [text + "."]


def backlog_text(backlog: dict[str, Any]) -> str:
    """How fast the saga drained what place left PENDING (`bench.scenarios.postgres.watch_backlog`)."""
    return (
        f"{backlog.get('saga_events_per_s')} events/s ({backlog.get('pending_left')} left "
        f"after {backlog.get('pending_after_s')} s)"
    )


def sqlite_backlog_notes(lite: dict[str, Any]) -> list[str]:
    """What SQLite's closed-loop place left to its saga (one writer: the place transactions and the
    saga's take turns)."""
    backlog = lite.get("saga_backlog")
    if not backlog:
        return []
    return [
        f"SQLite: {backlog.get('pending_at_end_of_place')} outbox events were PENDING when place ended "
        f"(of {(lite.get('place') or {}).get('completed')} orders placed); the saga drained them at "
        f"{backlog_text(backlog)}."
    ]


def split_notes(split: dict[str, Any]) -> list[str]:
    """What the saga process left behind place, and the API process's CPU at the half-peak rate."""
    if not split:
        return []
    backlog = split.get("saga_backlog") or {}
    text = (
        "Saga in its own process (bench/scenarios/split.py): `orders-server --workers 1 --saga-processes 1`, "
        "whose worker on the port takes the calls and runs no saga, and whose saga process takes no call "
        "and runs the sagas at nice 10; when place ended "
        f"{backlog.get('pending_at_end_of_place')} events were PENDING, drained at {backlog_text(backlog)}"
    )
    half = split.get("place_half") or {}
    used, rate = half.get("cpu") or {}, half.get("per_s")
    if used and rate:
        text += (
            f"; at the half-peak rate, the worker on the port: {cpu_text(used)}, "
            f"{used['server_cores'] / rate * 1000:.2f} ms of its CPU per call"
        )
    return [text + "."]


def relay_notes(result: dict[str, Any]) -> list[str]:
    """What the relay and soak runs did, and what quick shortened."""
    plan, relay_result, soak = result["plan"], result.get("relay") or {}, result.get("soak") or {}
    pickup = relay_result.get("pickup") or {}
    return [
        f"Drain: {plan['drain_events']} events queued before the consumer starts, in one fresh database "
        "for both queues; ours is `OutboxDispatcher` in its own process (16 saga workers, pool of 18, a "
        "no-op handler returning Done), timed until `stats.done` reaches the count; pgqueuer "
        f"{(relay_result.get('pgqueuer_drain') or {}).get('settings')}, timed until drain mode returns.",
        f"Pickup: a paced producer at {PICKUP_RATE:g}/s for {plan['pickup_s']:g} s; ours pairs each "
        "PlaceOrder call's start (its own `x-correlation-id`) with the saga's DEBUG line `handling "
        "ORDER_CREATED event` in the server's JSON log (`--saga-workers 16` like pgqueuer's 16 in "
        "flight, defaults otherwise); "
        f"jobs not picked up {plan['pickup_wait_s']:g} s after the last was sent count as slower than all; "
        f"{pickup.get('pending_after')} of our events were still PENDING at the end.",
        f"Soak: closed-loop place from {result['config']['in_flight']} calls in flight for "
        f"{soak.get('soak_s', 0):g} s on a fresh server with "
        f"`--outbox-retention-s {soak.get('retention_s', 0):g}` "
        "(default 3600 s, housekeeping every 5 s: a tenth of the soak, so DONE rows are purged during it); "
        f"RSS {soak.get('mid_kb', 0) / 1024:.0f} MB at the midpoint, {soak.get('end_kb', 0) / 1024:.0f} MB "
        f"at the end, peak {(soak.get('peak_kb') or 0) / 1024:.0f} MB; {soak.get('orders')} orders placed, "
        f"{soak.get('pending_left')} events PENDING and {soak.get('outbox_rows_left')} outbox rows left.",
        plan["note"],
    ]
