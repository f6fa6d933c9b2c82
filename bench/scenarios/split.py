"""The saga in a process of its own: an API-only `orders-server --saga-workers 0` takes every call,
and a second `orders-server` on the same database, which takes no call, runs the sagas, at a lower
CPU priority (every thread at nice 10, as `nice -n 10 orders-server` would start it).

What it shows beside the one-process rows: how much of PlaceOrder's throughput and tail is the
saga's share of the one process (its GIL and its CPU), and whether one saga process keeps up with
one API process (the backlog when place ends). docs/operations.md, "Topologies", says when to
deploy this way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import operations
from bench.plan import SKUS
from bench.runner import Runner
from bench.scenarios.postgres import paced_place, watch_backlog
from bench.server import BenchServer, database_url, pending_events, postgres_server

SAGA_NICE = 10


def renice(pid: int, niceness: int) -> None:
    """Every thread of `pid` at `niceness` (Linux keeps it per thread; threads started later take
    their creator's)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(task), niceness)


@contextmanager
def split_servers(workdir: Path, label: str, server_args: list[str]) -> Iterator[tuple[BenchServer, str]]:
    """A fresh database with an API-only server and a saga server on it; yields the API server
    (the one to call) and the database's name."""
    with postgres_server(workdir, f"{label}-api", [*server_args, "--saga-workers", "0"]) as (api, dbname):
        saga = BenchServer(database_url(dbname), workdir / f"server-postgresql-{label}-saga.log", server_args)
        try:
            renice(saga.proc.pid, SAGA_NICE)
            yield api, dbname
        finally:
            saga.stop()


def run_split(runner: Runner, workdir: Path, server_args: list[str], half_rate: float) -> dict[str, Any]:
    """Flow and place at the peak (flow first: place leaves a backlog), the saga's backlog after
    place, then place paced at the one-process rows' half-peak rate on a fresh database."""
    out: dict[str, Any] = {}
    params = {"skus": SKUS}
    with split_servers(workdir, "split", server_args) as (api, dbname):
        own = "saga in its own process"
        out["flow"] = runner.scenario(f"flow, {own}", api.address, operations.flow_op, params)
        out["place"] = runner.scenario(f"place, {own}", api.address, operations.place_op, params)
        out["saga_backlog"] = watch_backlog(dbname, min(runner.duration / 2, 3.0))
        print(f"  saga backlog after place (own process): {out['saga_backlog']}", flush=True)
    with split_servers(workdir, "split-paced", server_args) as (api, dbname):
        out["place_half"] = paced_place(runner, api, params, half_rate)
        out["place_half"]["backlog_after"] = pending_events(dbname)
    return out
