"""What a benchmark run does: the quick and full plans, and the parameters every run shares."""

from __future__ import annotations

from typing import Any

# The maintenance database of the local PostgreSQL: each run creates its own databases beside it.
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
SKUS = 1000
PLACE_METHOD = "/orders.v1.OrderService/PlaceOrder"
MACHINE_NOTE = "2 cores, shared; figures are ratios to the baseline of the same run"
PICKUP_RATE = 200.0  # jobs (orders) per second, the steady rate
RELAY_IN_FLIGHT = 16  # handlers at once, ours and pgqueuer's, in the drain and the pickup
SOAK_ORDERS = 100_000  # the RSS target is for a server that has placed this many orders

# What --quick shortens, and the full run it stands for.
QUICK: dict[str, Any] = {
    "duration_s": 4.0,
    "warmup_s": 0.5,
    "drain_events": 4_000,
    "pickup_s": 5.0,
    "pickup_wait_s": 2.0,
    "soak_s": 6.0,
    "workers": [1, 2],
    "workers_flow": False,
    "workers_s": 3.0,
    "note": "Quick run: 4 s per scenario after 0.5 s warm-up (full: 30 s after 3 s), pgbench 2 s per "
    "script (full: 12 s), 2 s watching the saga backlog (full: 3 s), a drain of 4,000 events (full: "
    "50,000), pickup for 5 s and 2 s for the stragglers (full: 10 s and 10 s), and a 6 s soak (full: "
    "10 minutes), and `--workers` 1 and 2 for 3 s each with baseline and place only (full: 1, 2 and 3, "
    "30 s each, with flow), each beside the bare stack with as many processes.",
}
FULL: dict[str, Any] = {
    "duration_s": 30.0,
    "warmup_s": 3.0,
    "drain_events": 50_000,
    "pickup_s": 10.0,
    "pickup_wait_s": 10.0,
    "soak_s": 600.0,
    "workers": [1, 2, 3],
    "workers_flow": True,
    "workers_s": 30.0,
    "note": "Full run: 30 s per scenario, a drain of 50,000 events, pickup for 10 s, a 10-minute soak.",
}
