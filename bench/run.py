"""The benchmark: `.venv/bin/python -m bench.run --quick` (under 2 minutes) or without `--quick`.

Creates a throwaway PostgreSQL database, migrates it, starts one real `orders-server` on it, loads
stock, drives closed-loop load from client processes, runs pgbench on the same SQL work (place;
place plus saga; hot place plus saga), then does baseline and place again on SQLite. Then the relay
figures next to the peer, pgqueuer (bench/relay.py): drain of queued events with a no-op handler,
and pickup latency at a steady 200/s; and a soak of closed-loop place that samples the server's
RSS. Writes bench/results/<time>.json and prints a markdown table that it also writes to
docs/benchmarks.md. Every figure is meant to be read as a ratio to the health-check baseline of the
same run, or to the peer's figure of the same run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import cpu, load, relay, scenarios

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
READY = re.compile(r"orders-server ready on (?P<host>\S+):(?P<port>\d+)")
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
SKUS = 1000
PLACE_METHOD = "/orders.v1.OrderService/PlaceOrder"
MACHINE_NOTE = "2 cores, shared; figures are ratios to the baseline of the same run"
# What --quick shortens, and the full run it stands for.
QUICK = {
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
    "30 s each, with flow).",
}
FULL = {
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
PICKUP_RATE = 200.0  # jobs (orders) per second, the steady rate
RELAY_IN_FLIGHT = 16  # handlers at once, ours and pgqueuer's, in the drain and the pickup
SOAK_ORDERS = 100_000  # the RSS target is for a server that has placed this many orders


def server_command() -> list[str]:
    script = Path(sys.executable).parent / "orders-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.main"]


def server_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["ORDERS_DATABASE_URL"] = database_url
    return env


class Server:
    """One `orders-server` process on port 0; its log goes to a file."""

    def __init__(self, database_url: str, log_path: Path, extra_args: list[str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.metrics_port = free_port()
        self.proc = subprocess.Popen(
            [*server_command(), "--port", "0", "--metrics-port", str(self.metrics_port), *extra_args],
            env=server_env(database_url),
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"orders-server exited with {self.proc.returncode}:\n{self.log()}")
            match = READY.search(self.log())
            if match:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"orders-server not ready after 60 s:\n{self.log()}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{match.group('port')}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """The Prometheus samples, keyed by the sample's name and labels."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def memory_kb(self) -> dict[str, int]:
        """VmHWM (peak RSS) and VmRSS of the server process, in kB."""
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                fields[name] = int(value.split()[0])
        return fields

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def histogram(
    before: dict[str, float], after: dict[str, float], name: str, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Percentiles of what a Prometheus histogram saw between two scrapes (the label sets that carry
    every one of `labels`, summed), interpolated linearly inside its buckets (so only as fine as
    the buckets: 1, 2.5, 5, 10, 25 ms...)."""
    buckets: dict[float, float] = {}
    wanted = (labels or {}).items()
    for key, value in after.items():
        match = re.fullmatch(name + r"_bucket\{(.*)\}", key)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if "le" in found and all(found.get(k) == v for k, v in wanted):
            bound = float(found["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value - before.get(key, 0.0)
    bounds = sorted(buckets)
    total = buckets.get(float("inf"), 0.0)
    out: dict[str, Any] = {"count": int(total)}
    for label, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
        if not total:
            out[label] = None
            continue
        target, lower, below = q * total, 0.0, 0.0
        for bound in bounds:
            if buckets[bound] >= target:
                if bound == float("inf"):
                    out[label] = f"> {lower * 1000:g}"
                else:
                    share = (target - below) / (buckets[bound] - below) if buckets[bound] > below else 1.0
                    out[label] = round((lower + share * (bound - lower)) * 1000, 1)
                break
            lower, below = bound, buckets[bound]
    return out


def create_database() -> str:
    name = f"orders_bench_{uuid.uuid4().hex[:8]}"
    connection = psycopg2.connect(PG_DSN)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    return name


def drop_database(name: str) -> None:
    connection = psycopg2.connect(PG_DSN)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    connection.close()


def migrate(database_url: str) -> None:
    subprocess.run(
        [*server_command(), "migrate"],
        env=server_env(database_url),
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


class Runner:
    def __init__(self, pool: Any, processes: int, threads: int, duration: float, warmup: float) -> None:
        self.pool = pool
        self.processes = processes
        self.threads = threads
        self.duration = duration
        self.warmup = warmup

    def scenario(
        self,
        name: str,
        address: str,
        factory: load.OpFactory,
        params: dict[str, Any],
        max_calls: int = 0,
        rate: float = 0.0,
        channels: int = 1,
    ) -> dict[str, Any]:
        duration = self.duration * 3 if max_calls else self.duration  # a counted run gets a cap
        result, window = load.run(
            self.pool,
            self.processes,
            address,
            factory,
            params,
            threads=self.threads,
            duration=duration,
            warmup=0.0 if max_calls else self.warmup,
            max_calls=max_calls,
            rate=rate,
            channels=channels,
        )
        row = load.summary(result, window, self.processes * self.threads)
        if rate:
            row["offered_per_s"] = round(rate, 1)
        print(f"  {name}: {row}", flush=True)
        return row

    def cpu_window(self, pid: int) -> cpu.CpuWindow:
        """CPU over the measured part of the next (uncounted) scenario: from a second after its
        warm-up to a second before its end, connects and warm-up left out."""
        return cpu.CpuWindow(pid, load.CONNECT_S + self.warmup + 1.0, max(self.duration - 2.0, 1.0))


@contextlib.contextmanager
def postgres_server(workdir: Path, label: str, server_args: list[str]) -> Iterator[tuple[Server, str]]:
    """A fresh database, migrated, stocked, with one server on it; all gone at the end."""
    dbname = create_database()
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{dbname}"
    try:
        migrate(url)
        server = Server(url, workdir / f"server-postgresql-{label}.log", server_args)
        try:
            # Plenty of stock on every SKU, so that flow orders validate.
            scenarios.load_stock(server.address, {scenarios.sku_name(n): 10**9 for n in range(SKUS)})
            yield server, dbname
        finally:
            server.stop()
    finally:
        drop_database(dbname)


def log_errors(server: Server) -> list[str]:
    marks = (" ERROR ", '"level": "ERROR"', "Traceback")
    return [line for line in server.log().splitlines() if any(mark in line for mark in marks)][:20]


def run_postgres(runner: Runner, workdir: Path, server_args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    params = {"skus": SKUS}
    with postgres_server(workdir, "closed-loop", server_args) as (server, dbname):
        out["baseline"] = runner.scenario("baseline", server.address, scenarios.health_op, {})
        # Flow and hot first: place outruns the saga and leaves a backlog that would delay them.
        before = server.metrics()
        with runner.cpu_window(server.proc.pid) as window:
            out["flow"] = runner.scenario("flow", server.address, scenarios.flow_op, params)
        out["flow"]["cpu"] = window.result()
        after = server.metrics()
        out["flow"]["dispatch_lag"] = histogram(before, after, "orders_outbox_dispatch_lag_seconds")
        out["flow"]["saga_handler"] = histogram(before, after, "orders_outbox_handler_seconds")
        print(f"  flow dispatch lag: {out['flow']['dispatch_lag']}", flush=True)
        print(f"  flow saga handler: {out['flow']['saga_handler']}", flush=True)
        out["hot"] = run_hot(runner, server.address, out["flow"]["per_s"])
        out["place"] = runner.scenario("place", server.address, scenarios.place_op, params)
        out["saga_backlog"] = watch_backlog(dbname, min(runner.duration / 2, 3.0))
        print(f"  saga backlog after place: {out['saga_backlog']}", flush=True)
        out["memory_kb"] = server.memory_kb()
        out["server_log_errors"] = log_errors(server)
        out["server_exit"] = server.stop()
    # Paced at half the peak place rate, on a fresh database (no backlog left by place).
    half_rate = out["place"]["per_s"] / 2
    with postgres_server(workdir, "paced", server_args) as (server, dbname):
        # What the load generator and gRPC alone add to a call at this rate: the floor of the p99.
        out["health_half"] = runner.scenario(
            "baseline at the half-peak rate", server.address, scenarios.health_op, {}, rate=half_rate
        )
        half = paced_place(runner, server, params, half_rate)
        half["backlog_after"] = pending_events(dbname)
        print(f"  place at half peak: dispatch lag {half['dispatch_lag']}", flush=True)
        out["place_half"] = half
        out["paced_server_log_errors"] = log_errors(server)
        out["paced_server_exit"] = server.stop()
        if shutil.which("pgbench"):
            seconds = max(2.0, runner.duration * 0.4)
            out["pgbench"] = scenarios.pgbench(dbname, runner.processes * runner.threads, seconds)
            print(f"  pgbench: {out['pgbench']}", flush=True)
    # The same rate with the saga off: what PlaceOrder costs alone, and its p99 without the saga's
    # share of the process (see docs/performance.md, "Latency at half the peak").
    with postgres_server(workdir, "paced-saga-off", [*server_args, "--saga-workers", "0"]) as (server, _):
        out["place_half_saga_off"] = paced_place(runner, server, params, half_rate)
    return out


def paced_place(runner: Runner, server: Server, params: dict[str, Any], rate: float) -> dict[str, Any]:
    """PlaceOrder at `rate`, with the server's own view of the calls (interceptor to reply), the
    saga's commit-to-dispatch lag and the CPU of the server and of PostgreSQL over the run."""
    before = server.metrics()
    with runner.cpu_window(server.proc.pid) as window:
        row = runner.scenario("place at half peak", server.address, scenarios.place_op, params, rate=rate)
    after = server.metrics()
    row["in_server"] = histogram(
        before, after, "orders_rpc_duration_seconds", {"method": PLACE_METHOD, "code": "OK"}
    )
    row["dispatch_lag"] = histogram(before, after, "orders_outbox_dispatch_lag_seconds")
    row["cpu"] = window.result()
    print(f"  in the server: {row['in_server']}; cpu: {row['cpu']}", flush=True)
    return row


def pending_events(dbname: str) -> int:
    connection = psycopg2.connect(PG_DSN.replace("dbname=postgres", f"dbname={dbname}"))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM outbox_events WHERE status = 'PENDING'")
            row = cursor.fetchone()
            return int(row[0]) if row else 0
    finally:
        connection.close()


def watch_backlog(dbname: str, limit_s: float) -> dict[str, Any]:
    """The PENDING outbox events place left behind, and how fast the real saga drains them."""
    began = time.monotonic()
    first = pending_events(dbname)
    left = first
    while left and time.monotonic() - began < limit_s:
        time.sleep(0.25)
        left = pending_events(dbname)
    elapsed = time.monotonic() - began
    return {
        "pending_at_end_of_place": first,
        "pending_after_s": round(elapsed, 2),
        "pending_left": left,
        "saga_events_per_s": round((first - left) / elapsed, 1) if elapsed > 0 else None,
    }


def run_hot(runner: Runner, address: str, flow_rate: float) -> dict[str, Any]:
    """Every order for one unit of one SKU, stock for half of them; settles all, checks no oversell."""
    in_flight = runner.processes * runner.threads
    per_thread = max(4, int(flow_rate * runner.duration / in_flight))
    orders = per_thread * in_flight
    initial = orders // 2
    sku = "HOT-0001"
    scenarios.load_stock(address, {sku: initial})
    row = runner.scenario("hot", address, scenarios.flow_op, {"hot_sku": sku}, max_calls=per_thread)
    stock = scenarios.get_stock(address, sku)
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


def run_sqlite(runner: Runner, workdir: Path, server_args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="orders-bench-") as tmp:
        url = f"sqlite:///{tmp}/orders.db"
        server = Server(url, workdir / "server-sqlite.log", server_args)
        try:
            scenarios.load_stock(server.address, {scenarios.sku_name(n): 10**9 for n in range(SKUS)})
            out["baseline"] = runner.scenario("sqlite baseline", server.address, scenarios.health_op, {})
            out["place"] = runner.scenario("sqlite place", server.address, scenarios.place_op, {"skus": SKUS})
            out["memory_kb"] = server.memory_kb()
        finally:
            out["server_exit"] = server.stop()
    return out


def database_dsn(dbname: str) -> str:
    return PG_DSN.replace("dbname=postgres", f"dbname={dbname}")


def run_relay(plan: dict[str, Any], workdir: Path, server_args: list[str]) -> dict[str, Any]:
    """Drain and pickup, ours and pgqueuer's. Both queues live in one fresh database, filled before
    either consumer starts; each consumer drains its own queue alone."""
    out: dict[str, Any] = {}
    events, seconds = plan["drain_events"], plan["pickup_s"]
    dbname = create_database()
    try:
        url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{dbname}"
        migrate(url)
        relay.insert_pending(database_dsn(dbname), events)
        relay.pgq_prepare(dbname, events)
        (out["drain"],) = relay.in_processes((relay.our_drain, url, events, RELAY_IN_FLIGHT))
        print(f"  our drain: {out['drain']}", flush=True)
        (out["pgqueuer_drain"],) = relay.in_processes((relay.pgq_drain, dbname, events, RELAY_IN_FLIGHT))
        print(f"  pgqueuer drain: {out['pgqueuer_drain']}", flush=True)
        out["pgqueuer_pickup"] = pgqueuer_pickup(dbname, seconds, plan["pickup_wait_s"])
        print(f"  pgqueuer pickup: {out['pgqueuer_pickup']}", flush=True)
    finally:
        drop_database(dbname)
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
    row = relay.pickup(sent, consumer["started"], PICKUP_RATE, seconds)
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
        started = relay.handler_starts(server.log())
        while len(started) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.25)
            started = relay.handler_starts(server.log())
        row = relay.pickup(sent, started, PICKUP_RATE, seconds)
        row["pending_after"] = pending_events(dbname)
        row["server_log_errors"] = log_errors(server)
        row["server_exit"] = server.stop()
    return row


def run_workers(runner: Runner, workdir: Path, args: list[str], plan: dict[str, Any]) -> dict[str, Any]:
    """Baseline, place and (full run) flow against `--workers N` for each N, fresh database each.

    Every client thread has its own connection here (the kernel spreads connections, not calls,
    over the workers' sockets), for N = 1 as well, so the rows compare like with like."""
    out: dict[str, Any] = {}
    params = {"skus": SKUS}
    # Flow before place: place outruns the saga and leaves a backlog that flow would wait behind.
    chosen = [("baseline", scenarios.health_op, {})]
    if plan["workers_flow"]:
        chosen.append(("flow", scenarios.flow_op, params))
    chosen.append(("place", scenarios.place_op, params))
    for count in plan["workers"]:
        with postgres_server(workdir, f"workers-{count}", [*args, "--workers", str(count)]) as (server, _):
            row: dict[str, Any] = {}
            for name, factory, op_params in chosen:
                label, threads = f"{name}, --workers {count}", runner.threads
                row[name] = runner.scenario(label, server.address, factory, op_params, channels=threads)
            row["server_log_errors"] = log_errors(server)
            row["server_exit"] = server.stop()
        out[str(count)] = row
    return out


def run_soak(runner: Runner, workdir: Path, server_args: list[str], plan: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop place for the soak's length on a fresh server, its VmRSS sampled every second.

    The outbox retention is cut to a tenth of the soak (5 s at least) so that housekeeping purges
    DONE rows during it, as it does in a production run longer than the default retention."""
    seconds = plan["soak_s"]
    retention = max(5.0, seconds / 10)
    args = [*server_args, "--outbox-retention-s", f"{retention:g}"]
    with postgres_server(workdir, "soak", args) as (server, dbname):
        samples: list[tuple[float, int, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(server, dbname, samples, stop), daemon=True)
        sampler.start()
        try:
            result, _ = load.run(
                runner.pool,
                runner.processes,
                server.address,
                scenarios.place_op,
                {"skus": SKUS},
                threads=runner.threads,
                duration=seconds,
                warmup=0.0,
            )
        finally:
            stop.set()
            sampler.join()
        out = rss_summary(samples, seconds)
        out.update(
            orders=count_rows(dbname, "orders"),
            outbox_rows_left=count_rows(dbname, "outbox_events"),
            pending_left=pending_events(dbname),
            errors=dict(result.errors),
            retention_s=retention,
            peak_kb=server.memory_kb().get("VmHWM"),
            server_log_errors=log_errors(server),
            server_exit=server.stop(),
        )
    print(f"  soak: { {k: v for k, v in out.items() if k != 'samples'} }", flush=True)
    return out


def sample_rss(
    server: Server, dbname: str, samples: list[tuple[float, int, int]], stop: threading.Event
) -> None:
    """Every second: seconds since the start, the server's VmRSS in kB, and the orders placed so far."""
    began = time.monotonic()
    connection = psycopg2.connect(database_dsn(dbname))
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            while not stop.wait(1.0):
                cursor.execute("SELECT count(*) FROM orders")
                row = cursor.fetchone()
                rss = server.memory_kb()["VmRSS"]
                samples.append((round(time.monotonic() - began, 1), rss, int(row[0]) if row else 0))
    finally:
        connection.close()


def rss_summary(samples: list[tuple[float, int, int]], seconds: float) -> dict[str, Any]:
    """RSS at the soak's midpoint and end, the growth between them (the second half), and RSS at the
    first sample that had seen SOAK_ORDERS orders (None if the soak placed fewer)."""
    if not samples:
        return {"samples": samples}
    # load.run starts its window half a second after it is called.
    middle = next((kb for at, kb, _ in samples if at >= 0.5 + seconds / 2), samples[-1][1])
    end = samples[-1][1]
    reached = next(
        ({"at_s": at, "rss_kb": kb, "orders": n} for at, kb, n in samples if n >= SOAK_ORDERS), None
    )
    return {
        "samples": samples,
        "soak_s": seconds,
        "mid_kb": middle,
        "end_kb": end,
        "growth_second_half_pct": round((end - middle) / middle * 100, 1),
        "at_target_orders": reached,
    }


def count_rows(dbname: str, table: str) -> int:
    connection = psycopg2.connect(database_dsn(dbname))
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 - our own table names
            row = cursor.fetchone()
            return int(row[0]) if row else 0
    finally:
        connection.close()


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def markdown(result: dict[str, Any]) -> str:
    pg, lite = result["postgresql"], result.get("sqlite", {})
    config = result["config"]
    lines = [
        "# Benchmarks",
        "",
        f"Latest run: `{result['command']}` on {result['time']} ({MACHINE_NOTE}).",
        f"Load: {config['processes']} client processes x {config['threads']} threads "
        f"= {config['in_flight']} calls in flight, closed loop, "
        f"{config['duration_s']:g} s per scenario after {config['warmup_s']:g} s warm-up; "
        f"one `orders-server` ({' '.join(config['server_args'])}, --metrics-port on, otherwise defaults).",
        "",
        "| scenario | database | per s | p50 ms | p95 ms | p99 ms | completed | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def row(name: str, database: str, figures: dict[str, Any] | None) -> None:
        if not figures:
            return
        errors = ", ".join(f"{k} {v}" for k, v in figures["errors"].items()) or "0"
        lines.append(
            f"| {name} | {database} | {figures['per_s']:.0f} | {figures['p50_ms']:.1f} | "
            f"{figures['p95_ms']:.1f} | {figures['p99_ms']:.1f} | {figures['completed']} | {errors} |"
        )

    row("baseline (Health/Check)", "PostgreSQL", pg.get("baseline"))
    row("flow (place, WatchOrder to terminal)", "PostgreSQL", pg.get("flow"))
    row("hot (one SKU, stock for half, place to terminal)", "PostgreSQL", pg.get("hot"))
    row("place (PlaceOrder, 1-3 items of 1,000 SKUs)", "PostgreSQL", pg.get("place"))
    half_rate = (pg.get("place_half") or {}).get("offered_per_s")
    row(f"place, paced at half the peak ({half_rate}/s offered)", "PostgreSQL", pg.get("place_half"))
    row("baseline (Health/Check), paced at the same rate", "PostgreSQL", pg.get("health_half"))
    saga_off = pg.get("place_half_saga_off")
    row("place, paced at the same rate, saga off (`--saga-workers 0`)", "PostgreSQL", saga_off)
    row("baseline (Health/Check)", "SQLite", lite.get("baseline"))
    row("place", "SQLite", lite.get("place"))
    titles = {
        "place": "place transaction",
        "place_saga": "place + saga transactions",
        "hot_place_saga": "hot SKU place + saga transactions",
    }
    for name, bench in (pg.get("pgbench") or {}).items():
        if bench.get("tps"):
            lines.append(
                f"| pgbench: {titles.get(name, name)} ({bench['clients']} clients) | PostgreSQL | "
                f"{bench['tps']:.0f} | avg {bench['latency_avg_ms']:.1f} | | | | {bench.get('failed') or 0} |"
            )
        else:
            lines.append(f"| pgbench: {titles.get(name, name)} | PostgreSQL | failed: {bench.get('error')} |")
    relay_rows(lines, result.get("relay") or {})
    soak = result.get("soak") or {}
    if soak:
        lines.append(
            f"| soak: closed-loop place, {soak['soak_s']:g} s | PostgreSQL | "
            f"{soak['orders'] / soak['soak_s']:.0f} | | | | {soak['orders']} | "
            f"{', '.join(f'{k} {v}' for k, v in soak['errors'].items()) or '0'} |"
        )
    hot = (pg.get("hot") or {}).get("check", {})
    memory = pg.get("memory_kb", {})
    backlog = pg.get("saga_backlog") or {}
    half = pg.get("place_half") or {}
    lag = (pg.get("flow") or {}).get("dispatch_lag") or {}
    handler = (pg.get("flow") or {}).get("saga_handler") or {}
    lines += ["", "| figure | value | target (issue 7) |", "| --- | --- | --- |"]
    for name, value, target in result["figures"]:
        lines.append(f"| {name} | {value} | {target} |")
    lines += [
        "",
        f"Hot SKU: {hot.get('orders')} orders for {hot.get('initial')} units; after the run available "
        f"{hot.get('available')}, reserved {hot.get('reserved')}, validated orders {hot.get('validated')}, "
        f"settled {hot.get('settled')}.",
        f"Server (PostgreSQL) memory: peak RSS (VmHWM) {memory.get('VmHWM', 0) / 1024:.0f} MB, "
        f"RSS at the end {memory.get('VmRSS', 0) / 1024:.0f} MB.",
        f"Place outruns the saga: {backlog.get('pending_at_end_of_place')} outbox events were PENDING when "
        f"place ended; the saga (8 workers, real handler) drained them at "
        f"{backlog.get('saga_events_per_s')} events/s ({backlog.get('pending_left')} left after "
        f"{backlog.get('pending_after_s')} s).",
        f"During flow (server metrics, interpolated in the histogram buckets): commit-to-dispatch lag "
        f"p50 {lag.get('p50_ms')} ms, p95 {lag.get('p95_ms')} ms, p99 {lag.get('p99_ms')} ms over "
        f"{lag.get('count')} events; saga handler (claim to outcome) p50 {handler.get('p50_ms')} ms, "
        f"p99 {handler.get('p99_ms')} ms.",
        f"Place paced at half the peak ran on a fresh database; {half.get('backlog_after')} outbox events "
        "were still PENDING when it ended (the saga did not keep up if that is large).",
        *flow_cpu_notes(pg),
        *half_peak_notes(pg),
        *relay_notes(result),
        "",
        *workers_table(result),
        "What the profiles show, and what stands in the way of each target: "
        "[performance.md](performance.md).",
        "",
    ]
    return "\n".join(lines)


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


def workers_table(result: dict[str, Any]) -> list[str]:
    """Throughput per `--workers N`, each also as a ratio to N = 1 of the same run."""
    runs = result.get("workers") or {}
    if not runs:
        return []
    lines = [
        "Scaling with `--workers N` (each client thread on its own connection; fresh database per N):",
        "",
        "| workers | baseline per s | place per s | flow per s | place / baseline | "
        "baseline vs 1 | place vs 1 | flow vs 1 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    one = runs.get("1") or {}

    def per_s(row: dict[str, Any], name: str) -> float | None:
        return (row.get(name) or {}).get("per_s")

    for count, row in runs.items():
        cells = [per_s(row, n) for n in ("baseline", "place", "flow")]
        versus = [ratio(per_s(row, n), per_s(one, n)) for n in ("baseline", "place", "flow")]
        lines.append(
            f"| {count} | "
            + " | ".join(f"{c:.0f}" if c is not None else "-" for c in cells)
            + f" | {ratio(cells[1], cells[0])} | "
            + " | ".join(str(v) if v is not None else "-" for v in versus)
            + " |"
        )
    lines.append("")
    return lines


def relay_rows(lines: list[str], relay_result: dict[str, Any]) -> None:
    """Drain and pickup rows for the scenario table: ours, then pgqueuer's."""
    for key, name in (("drain", "our outbox dispatcher"), ("pgqueuer_drain", "pgqueuer")):
        drain = relay_result.get(key)
        if drain:
            lines.append(
                f"| drain: {drain['events']} queued, no-op handler, {drain['in_flight']} in flight, "
                f"{name} ({drain['settings']}) | PostgreSQL | {drain['per_s']:.0f} | | | | "
                f"{drain['events']} | 0 |"
            )
    titles = {
        "pickup": "PlaceOrder start -> saga handler start (ours)",
        "pgqueuer_pickup": "enqueue start -> handler start (pgqueuer)",
    }
    for key, name in titles.items():
        row = relay_result.get(key)
        if row:
            cells = " | ".join(
                str(row[q] if row[q] is not None else "-") for q in ("p50_ms", "p95_ms", "p99_ms")
            )
            lines.append(
                f"| pickup at {row['rate_per_s']:g}/s for {row['duration_s']:g} s, {name} | PostgreSQL | "
                f"{row['sent'] / row['duration_s']:.0f} | {cells} | "
                f"{row['paired']} of {row['sent']} paired | 0 |"
            )


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


def figures(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    pg, lite = result["postgresql"], result.get("sqlite", {})

    def rate(group: dict[str, Any], name: str) -> float | None:
        return (group.get(name) or {}).get("per_s")

    hot = (pg.get("hot") or {}).get("check", {})
    pgbench = pg.get("pgbench") or {}
    place_tps = (pgbench.get("place") or {}).get("tps")
    saga_tps = (pgbench.get("place_saga") or {}).get("tps")
    hot_tps = (pgbench.get("hot_place_saga") or {}).get("tps")
    lag = (pg.get("flow") or {}).get("dispatch_lag") or {}
    half = pg.get("place_half") or {}
    half_lag = half.get("dispatch_lag") or {}
    peak = pg.get("memory_kb", {}).get("VmHWM")
    pg_place = ratio(rate(pg, "place"), rate(pg, "baseline"))
    lite_place = ratio(rate(lite, "place"), rate(lite, "baseline"))
    return [
        ("place / baseline throughput (PostgreSQL)", str(pg_place), ">= 0.30"),
        ("place / baseline throughput (SQLite)", str(lite_place), ">= 0.25"),
        ("flow orders/s / place orders/s", str(ratio(rate(pg, "flow"), rate(pg, "place"))), "-"),
        ("place / pgbench place tps", str(ratio(rate(pg, "place"), place_tps)), "-"),
        ("flow orders/s / pgbench place-plus-saga tps", str(ratio(rate(pg, "flow"), saga_tps)), ">= 0.50"),
        ("hot orders/s / pgbench hot place-plus-saga tps", str(ratio(rate(pg, "hot"), hot_tps)), ">= 0.50"),
        (
            "commit-to-dispatch lag p50 / p99 during flow (32 in flight)",
            f"{lag.get('p50_ms')} / {lag.get('p99_ms')} ms",
            "-",
        ),
        ("place p99 at half the peak rate", f"{half.get('p99_ms')} ms", "<= 25 ms"),
        (
            "the same rate: place p99 with the saga off; Health/Check p99",
            f"{(pg.get('place_half_saga_off') or {}).get('p99_ms')} ms; "
            f"{(pg.get('health_half') or {}).get('p99_ms')} ms",
            "-",
        ),
        (
            "commit-to-dispatch lag p50 / p99 at half the peak place rate",
            f"{half_lag.get('p50_ms')} / {half_lag.get('p99_ms')} ms",
            "p50 <= 5 ms, p99 <= 50 ms",
        ),
        ("hot orders/s / flow orders/s", str(ratio(rate(pg, "hot"), rate(pg, "flow"))), "-"),
        ("hot: no oversell", "yes" if hot.get("no_oversell") else "NO", "zero oversell"),
        ("server peak RSS (PostgreSQL closed-loop run)", f"{(peak or 0) / 1024:.0f} MB", "-"),
        *relay_figures(result.get("relay") or {}),
        *soak_figures(result.get("soak") or {}),
    ]


def relay_figures(relay_result: dict[str, Any]) -> list[tuple[str, str, str]]:
    ours, peer = relay_result.get("pickup") or {}, relay_result.get("pgqueuer_pickup") or {}
    drain, peer_drain = relay_result.get("drain") or {}, relay_result.get("pgqueuer_drain") or {}
    verdicts = [
        "yes" if ours.get(q) is not None and peer.get(q) is not None and ours[q] <= peer[q] else "no"
        for q in ("p50_ms", "p99_ms")
    ]
    return [
        (
            f"pickup latency at {PICKUP_RATE:g} orders/s, PlaceOrder start -> saga handler start, p50 / p99",
            f"{latency(ours.get('p50_ms'))} / {latency(ours.get('p99_ms'))} (pgqueuer, enqueue start -> "
            f"handler start: {latency(peer.get('p50_ms'))} / {latency(peer.get('p99_ms'))}); "
            f"no worse: p50 {verdicts[0]}, p99 {verdicts[1]}",
            "p50 and p99 no worse than pgqueuer's in the same run",
        ),
        (
            f"drain, no-op handler, {RELAY_IN_FLIGHT} in flight ({drain.get('events')} events)",
            f"{drain.get('per_s')} events/s = {ratio(drain.get('per_s'), peer_drain.get('per_s'))} x "
            f"pgqueuer's {peer_drain.get('per_s')}",
            ">= 5,000 events/s and >= 2.5 x pgqueuer's drain in the same run",
        ),
    ]


def latency(value: float | None) -> str:
    return "not all picked up" if value is None else f"{value} ms"


def soak_figures(soak: dict[str, Any]) -> list[tuple[str, str, str]]:
    """RSS once SOAK_ORDERS orders were placed, or at the end of a soak that placed fewer."""
    reached, peak = soak.get("at_target_orders"), soak.get("peak_kb") or 0
    orders, rss = (
        (reached["orders"], reached["rss_kb"]) if reached else (soak.get("orders"), soak.get("end_kb"))
    )
    where = "" if reached else f", end of the soak: fewer than {SOAK_ORDERS:,}"
    return [
        (
            f"server RSS after {orders} orders (peak {peak / 1024:.0f} MB{where})",
            f"{(rss or 0) / 1024:.0f} MB",
            "<= 200 MB after 100,000 orders",
        ),
        (
            f"server RSS growth over the second half of the soak ({soak.get('soak_s', 0):g} s)",
            f"{soak.get('growth_second_half_pct')} %",
            "<= 10 %",
        ),
    ]


def section(name: str, began: float) -> None:
    print(f"{name} (at {time.monotonic() - began:.0f} s):", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (the whole run under 2 minutes)")
    parser.add_argument("--duration", type=float, help="seconds per scenario (default 4 quick, 30 full)")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=16, help="threads per client process")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite run")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    duration = args.duration or plan["duration_s"]
    warmup = plan["warmup_s"]
    in_flight = args.processes * args.threads
    # Admit every call of the load (plus the watch streams of flow) so none is refused at the door.
    server_args = ["--max-concurrent-rpcs", str(max(256, 4 * in_flight))]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = RESULTS / stamp
    workdir.mkdir(parents=True, exist_ok=True)
    command = ".venv/bin/python -m bench.run " + " ".join(sys.argv[1:])
    result: dict[str, Any] = {
        "command": command.strip(),
        "time": stamp,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "note": MACHINE_NOTE},
        "config": {
            "processes": args.processes,
            "threads": args.threads,
            "in_flight": in_flight,
            "duration_s": duration,
            "warmup_s": warmup,
            "server_args": server_args,
        },
        "plan": plan,
    }
    began = time.monotonic()
    context = multiprocessing.get_context("spawn")  # grpc does not survive fork
    with context.Pool(args.processes) as pool:
        pool.map(load.warm, range(args.processes * 4), chunksize=1)
        runner = Runner(pool, args.processes, args.threads, duration, warmup)
        section("PostgreSQL", began)
        result["postgresql"] = run_postgres(runner, workdir, server_args)
        if not args.no_sqlite:
            section("SQLite", began)
            result["sqlite"] = run_sqlite(runner, workdir, server_args)
        section("Relay, ours and pgqueuer's", began)
        result["relay"] = run_relay(result["plan"], workdir, server_args)
        section("Soak", began)
        result["soak"] = run_soak(runner, workdir, server_args, result["plan"])
        section("Scaling with --workers N", began)
        short = Runner(pool, args.processes, args.threads, plan["workers_s"], warmup)
        result["workers"] = run_workers(short, workdir, server_args, plan)
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    result["figures"] = figures(result)
    (RESULTS / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print()
    print(table)
    if not args.no_docs:
        (ROOT / "docs" / "benchmarks.md").write_text(table)
    print(f"result: {RESULTS / f'{stamp}.json'} (server logs in {workdir}); {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
