"""The benchmark: `.venv/bin/python -m bench.run --quick` (about 2 minutes) or without `--quick`.

Creates a throwaway PostgreSQL database, migrates it, starts one real `orders-server` on it, loads
stock, drives closed-loop load from client processes, runs pgbench on the same SQL work (place;
place plus saga; hot place plus saga), then does baseline and place again on SQLite. Writes
bench/results/<time>.json and prints a markdown table that it also writes to docs/benchmarks.md.
Every figure is meant to be read as a ratio to the health-check baseline of the same run: the
machine is shared and noisy.
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
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench import load, scenarios

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
READY = re.compile(r"orders-server ready on (?P<host>\S+):(?P<port>\d+)")
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
SKUS = 1000
MACHINE_NOTE = "2 cores, shared; figures are ratios to the baseline of the same run"


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


def histogram(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, Any]:
    """Percentiles of what a Prometheus histogram (all label sets summed) saw between two scrapes,
    interpolated linearly inside its buckets (so only as fine as the buckets: 1, 2.5, 5, 10, 25 ms...)."""
    buckets: dict[float, float] = {}
    for key, value in after.items():
        match = re.fullmatch(name + r'_bucket\{(?:.*,)?le="([^"]+)"\}', key)
        if match:
            bound = float(match.group(1))
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
        )
        row = load.summary(result, window, self.processes * self.threads)
        if rate:
            row["offered_per_s"] = round(rate, 1)
        print(f"  {name}: {row}", flush=True)
        return row


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
    return [line for line in server.log().splitlines() if " ERROR " in line or "Traceback" in line][:20]


def run_postgres(runner: Runner, workdir: Path, server_args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    params = {"skus": SKUS}
    with postgres_server(workdir, "closed-loop", server_args) as (server, dbname):
        out["baseline"] = runner.scenario("baseline", server.address, scenarios.health_op, {})
        # Flow and hot first: place outruns the saga and leaves a backlog that would delay them.
        before = server.metrics()
        out["flow"] = runner.scenario("flow", server.address, scenarios.flow_op, params)
        after = server.metrics()
        out["flow"]["dispatch_lag"] = histogram(before, after, "orders_outbox_dispatch_lag_seconds")
        out["flow"]["saga_handler"] = histogram(before, after, "orders_outbox_handler_seconds")
        print(f"  flow dispatch lag: {out['flow']['dispatch_lag']}", flush=True)
        print(f"  flow saga handler: {out['flow']['saga_handler']}", flush=True)
        out["hot"] = run_hot(runner, server.address, out["flow"]["per_s"])
        out["place"] = runner.scenario("place", server.address, scenarios.place_op, params)
        out["saga_backlog"] = watch_backlog(dbname, min(runner.duration, 3.0))
        print(f"  saga backlog after place: {out['saga_backlog']}", flush=True)
        out["memory_kb"] = server.memory_kb()
        out["server_log_errors"] = log_errors(server)
        out["server_exit"] = server.stop()
    # Paced at half the peak place rate, on a fresh database (no backlog left by place).
    with postgres_server(workdir, "paced", server_args) as (server, dbname):
        before = server.metrics()
        half = runner.scenario(
            "place at half peak", server.address, scenarios.place_op, params, rate=out["place"]["per_s"] / 2
        )
        half["dispatch_lag"] = histogram(before, server.metrics(), "orders_outbox_dispatch_lag_seconds")
        half["backlog_after"] = pending_events(dbname)
        print(f"  place at half peak: dispatch lag {half['dispatch_lag']}", flush=True)
        out["place_half"] = half
        out["paced_server_log_errors"] = log_errors(server)
        out["paced_server_exit"] = server.stop()
        if shutil.which("pgbench"):
            seconds = max(3.0, runner.duration * 0.4)
            out["pgbench"] = scenarios.pgbench(dbname, runner.processes * runner.threads, seconds)
            print(f"  pgbench: {out['pgbench']}", flush=True)
    return out


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
        "",
        "Not measured yet (issue 7): drain of 50,000 events with a no-op handler, the pgqueuer peer "
        "(drain and pickup latency at 200/s), pickup latency PlaceOrder start to saga handler start, "
        "RSS after 100,000 orders and its growth over a soak, and scaling with `--workers N`.",
        "",
    ]
    return "\n".join(lines)


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
            "commit-to-dispatch lag p50 / p99 at half the peak place rate",
            f"{half_lag.get('p50_ms')} / {half_lag.get('p99_ms')} ms",
            "p50 <= 5 ms, p99 <= 50 ms",
        ),
        ("hot orders/s / flow orders/s", str(ratio(rate(pg, "hot"), rate(pg, "flow"))), "-"),
        ("hot: no oversell", "yes" if hot.get("no_oversell") else "NO", "zero oversell"),
        (
            "server peak RSS (PostgreSQL run)",
            f"{(peak or 0) / 1024:.0f} MB",
            "<= 200 MB after 100,000 orders",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="10 s per scenario (the whole run under 2 minutes)"
    )
    parser.add_argument("--duration", type=float, help="seconds per scenario (default 10 quick, 30 full)")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=16, help="threads per client process")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite run")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    duration = args.duration or (10.0 if args.quick else 30.0)
    warmup = 1.0 if args.quick else 3.0
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
    }
    began = time.monotonic()
    context = multiprocessing.get_context("spawn")  # grpc does not survive fork
    with context.Pool(args.processes) as pool:
        pool.map(load.warm, range(args.processes * 4), chunksize=1)
        runner = Runner(pool, args.processes, args.threads, duration, warmup)
        print("PostgreSQL:", flush=True)
        result["postgresql"] = run_postgres(runner, workdir, server_args)
        if not args.no_sqlite:
            print("SQLite:", flush=True)
            result["sqlite"] = run_sqlite(runner, workdir, server_args)
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
