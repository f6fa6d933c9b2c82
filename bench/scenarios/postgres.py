"""PostgreSQL: closed-loop baseline, flow, hot and place on one server, then place paced at half its
peak (with the saga and without), beside pgbench on the same SQL work."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import operations, pgbench
from bench.plan import PLACE_METHOD, SKUS
from bench.runner import Runner
from bench.server import BenchServer, histogram, pending_events, postgres_server


def run_postgres(runner: Runner, workdir: Path, server_args: list[str]) -> dict[str, Any]:
    out = closed_loop(runner, workdir, server_args)
    out.update(paced(runner, workdir, server_args, out["place"]["per_s"] / 2))
    return out


def closed_loop(runner: Runner, workdir: Path, server_args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    params = {"skus": SKUS}
    with postgres_server(workdir, "closed-loop", server_args) as (server, dbname):
        out["baseline"] = runner.scenario("baseline", server.address, operations.health_op, {})
        # Flow and hot first: place outruns the saga and leaves a backlog that would delay them.
        before = server.metrics()
        with runner.cpu_window(server.proc.pid) as window:
            out["flow"] = runner.scenario("flow", server.address, operations.flow_op, params)
        out["flow"]["cpu"] = window.result()
        after = server.metrics()
        out["flow"]["dispatch_lag"] = histogram(before, after, "orders_outbox_dispatch_lag_seconds")
        out["flow"]["saga_handler"] = histogram(before, after, "orders_outbox_handler_seconds")
        print(f"  flow dispatch lag: {out['flow']['dispatch_lag']}", flush=True)
        print(f"  flow saga handler: {out['flow']['saga_handler']}", flush=True)
        out["hot"] = run_hot(runner, server.address, out["flow"]["per_s"])
        out["place"] = runner.scenario("place", server.address, operations.place_op, params)
        out["saga_backlog"] = watch_backlog(lambda: pending_events(dbname), min(runner.duration / 2, 3.0))
        print(f"  saga backlog after place: {out['saga_backlog']}", flush=True)
        out["memory_kb"] = server.memory_kb()
        out["server_log_errors"] = server.log_errors()
        out["server_exit"] = server.stop()
    return out


def paced(runner: Runner, workdir: Path, server_args: list[str], half_rate: float) -> dict[str, Any]:
    """Paced at half the peak place rate, on a fresh database (no backlog left by place)."""
    out: dict[str, Any] = {}
    params = {"skus": SKUS}
    with postgres_server(workdir, "paced", server_args) as (server, dbname):
        # What the load generator and gRPC alone add to a call at this rate: the floor of the p99.
        out["health_half"] = runner.scenario(
            "baseline at the half-peak rate", server.address, operations.health_op, {}, rate=half_rate
        )
        half = paced_place(runner, server, params, half_rate)
        half["backlog_after"] = pending_events(dbname)
        print(f"  place at half peak: dispatch lag {half['dispatch_lag']}", flush=True)
        out["place_half"] = half
        out["paced_server_log_errors"] = server.log_errors()
        out["paced_server_exit"] = server.stop()
        if shutil.which("pgbench"):
            seconds = max(2.0, runner.duration * 0.4)
            out["pgbench"] = pgbench.pgbench(dbname, runner.in_flight, seconds)
            print(f"  pgbench: {out['pgbench']}", flush=True)
    # The same rate with the saga off: what PlaceOrder costs alone, and its p99 without the saga's
    # share of the process (see docs/performance.md, "Latency at half the peak").
    with postgres_server(workdir, "paced-saga-off", [*server_args, "--saga-workers", "0"]) as (server, _):
        out["place_half_saga_off"] = paced_place(runner, server, params, half_rate)
    return out


def paced_place(
    runner: Runner, server: BenchServer, params: dict[str, Any], rate: float, pid: int | None = None
) -> dict[str, Any]:
    """PlaceOrder at `rate`, with the server's own view of the calls (interceptor to reply), the
    saga's commit-to-dispatch lag and the CPU of the server (or of process `pid`, a worker of it)
    and of PostgreSQL over the run."""
    before = server.metrics()
    with runner.cpu_window(pid or server.proc.pid) as window:
        row = runner.scenario("place at half peak", server.address, operations.place_op, params, rate=rate)
    after = server.metrics()
    row["in_server"] = histogram(
        before, after, "orders_rpc_duration_seconds", {"method": PLACE_METHOD, "code": "OK"}
    )
    row["dispatch_lag"] = histogram(before, after, "orders_outbox_dispatch_lag_seconds")
    row["cpu"] = window.result()
    print(f"  in the server: {row['in_server']}; cpu: {row['cpu']}", flush=True)
    return row


def watch_backlog(pending: Callable[[], int], limit_s: float) -> dict[str, Any]:
    """The PENDING outbox events place left behind (`pending` counts them), and how fast the real
    saga drains them."""
    began = time.monotonic()
    first = pending()
    left = first
    while left and time.monotonic() - began < limit_s:
        time.sleep(0.25)
        left = pending()
    elapsed = time.monotonic() - began
    return {
        "pending_at_end_of_place": first,
        "pending_after_s": round(elapsed, 2),
        "pending_left": left,
        "saga_events_per_s": round((first - left) / elapsed, 1) if elapsed > 0 else None,
    }


def run_hot(runner: Runner, address: str, flow_rate: float) -> dict[str, Any]:
    """Every order for one unit of one SKU, stock for half of them; settles all, checks no oversell."""
    in_flight = runner.in_flight
    per_thread = max(4, int(flow_rate * runner.duration / in_flight))
    orders = per_thread * in_flight
    initial = orders // 2
    sku = "HOT-0001"
    operations.load_stock(address, {sku: initial})
    row = runner.scenario("hot", address, operations.flow_op, {"hot_sku": sku}, max_calls=per_thread)
    stock = operations.get_stock(address, sku)
    validated = row["outcomes"].get("ORDER_STATUS_VALIDATED", 0)
    settled = sum(row["outcomes"].values())
    row["check"] = {
        "orders": orders,
        "settled": settled,
        "initial": initial,
        "available": stock.available,
        "reserved": stock.reserved,
        "validated": validated,
        "no_oversell": stock.available >= 0
        and stock.reserved <= initial
        and stock.available + stock.reserved == initial
        and validated == stock.reserved,
    }
    print(f"  hot check: {row['check']}", flush=True)
    return row
