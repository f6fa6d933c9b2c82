"""The benchmark: `.venv/bin/python -m bench.run --quick` (under 2 minutes) or without `--quick`.

Creates a throwaway PostgreSQL database, migrates it, starts one real `orders-server` on it, loads
stock, drives closed-loop load from client processes, runs pgbench on the same SQL work (place;
place plus saga; hot place plus saga), then the bare stack (bench/bare_stack.py: the same gRPC
server and one psycopg2 write per call, nothing of ours) at its peak and at PlaceOrder's half-peak
rate, then flow and place with the saga in a process of its own (an API-only server and a saga
server), then does baseline and place again on SQLite. Then the relay figures next to the peer,
pgqueuer: drain of queued events with a no-op handler, and pickup latency at a steady rate; a soak
of closed-loop place that samples the server's RSS; and `--workers N` beside the bare stack with N
processes. Writes bench/results/<time>.json and prints a markdown table that it also writes to
docs/benchmarks.md. Every figure is meant to be read as a ratio to a baseline of the same run (the
health check, the bare stack) or to the peer's figure of the same run: the machine is shared and
noisy. What the figures show: docs/performance.md.

Layout. This module is the entry point: the plan (bench/plan.py), the order of the runs, the
result file. The runner: bench/runner.py (one scenario from the client processes of bench/load.py,
its CPU from bench/cpu.py) and bench/server.py (the server under test, its metrics, its database;
the bare stack's processes, whose server is bench/bare_stack.py).
The scenarios: bench/scenarios/ (one module per kind of run), driving the operations of
bench/operations.py, pgbench (bench/pgbench.py) and the relay's processes (bench/relay.py). The
report: bench/report/ (the page, its notes, the figures against their targets). What the tests use
too (server processes, the local PostgreSQL) is in tests/local_services.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench import load
from bench.plan import FULL, MACHINE_NOTE, QUICK
from bench.report.figures import figures
from bench.report.page import markdown
from bench.runner import Runner
from bench.scenarios import bare_stack, drain_and_pickup, postgres, soak, split, sqlite, workers
from tests.local_services import ROOT

RESULTS = ROOT / "bench" / "results"


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
        result["postgresql"] = postgres.run_postgres(runner, workdir, server_args)
        section("The bare stack", began)
        half_rate = result["postgresql"]["place_half"]["offered_per_s"]
        result["bare_stack"] = bare_stack.run_bare_stack(runner, workdir, half_rate)
        section("The saga in a process of its own", began)
        result["split"] = split.run_split(runner, workdir, server_args, half_rate)
        if not args.no_sqlite:
            section("SQLite", began)
            result["sqlite"] = sqlite.run_sqlite(runner, workdir, server_args)
        section("Relay, ours and pgqueuer's", began)
        result["relay"] = drain_and_pickup.run_relay(result["plan"], workdir, server_args)
        section("Soak", began)
        result["soak"] = soak.run_soak(runner, workdir, server_args, result["plan"])
        section("Scaling with --workers N", began)
        short = Runner(pool, args.processes, args.threads, plan["workers_s"], warmup)
        result["workers"] = workers.run_workers(short, workdir, server_args, plan)
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
