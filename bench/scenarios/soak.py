"""The soak: closed-loop place on a fresh server for the soak's length, its RSS sampled every second."""

from __future__ import annotations

import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from bench import load, operations
from bench.plan import SKUS, SOAK_ORDERS
from bench.runner import Runner
from bench.server import BenchServer, count_rows, database_url, pending_events, postgres_server
from tests.local_services import pg_connect


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
                operations.place_op,
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
            server_log_errors=server.log_errors(),
            server_exit=server.stop(),
        )
    print(f"  soak: { {k: v for k, v in out.items() if k != 'samples'} }", flush=True)
    return out


def sample_rss(
    server: BenchServer, dbname: str, samples: list[tuple[float, int, int]], stop: threading.Event
) -> None:
    """Every second: seconds since the start, the server's VmRSS in kB, and the orders placed so far."""
    began = time.monotonic()
    with (
        closing(pg_connect(database_url(dbname), autocommit=True)) as connection,
        connection.cursor() as cursor,
    ):
        while not stop.wait(1.0):
            cursor.execute("SELECT count(*) FROM orders")
            row = cursor.fetchone()
            rss = server.memory_kb()["VmRSS"]
            samples.append((round(time.monotonic() - began, 1), rss, int(row[0]) if row else 0))


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
