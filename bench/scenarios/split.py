"""The saga in a process of its own: `orders-server --workers 1 --saga-processes 1`, whose worker on
the port takes every call and runs no saga, and whose saga process takes no call and runs every
saga, at nice 10 (the default `--saga-process-nice`).

What it shows beside the one-process rows: how much of PlaceOrder's throughput and tail is the
saga's share of the one process (its GIL and its CPU), and whether one saga process keeps up with
one API process (the backlog when place ends). docs/operations.md, "The saga in processes of its
own", says when to deploy this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import operations
from bench.plan import SKUS
from bench.runner import Runner
from bench.scenarios.postgres import paced_place, watch_backlog
from bench.server import pending_events, postgres_server

SPLIT = ["--workers", "1", "--saga-processes", "1"]


def run_split(runner: Runner, workdir: Path, server_args: list[str], half_rate: float) -> dict[str, Any]:
    """Flow and place at the peak (flow first: place leaves a backlog), the saga's backlog after
    place, then place paced at the one-process rows' half-peak rate on a fresh database (with the
    CPU of the worker that takes the calls)."""
    out: dict[str, Any] = {}
    params = {"skus": SKUS}
    own = "saga in its own process"
    with postgres_server(workdir, "split", [*server_args, *SPLIT]) as (server, dbname):
        out["flow"] = runner.scenario(f"flow, {own}", server.address, operations.flow_op, params)
        out["place"] = runner.scenario(f"place, {own}", server.address, operations.place_op, params)
        out["saga_backlog"] = watch_backlog(lambda: pending_events(dbname), min(runner.duration / 2, 3.0))
        print(f"  saga backlog after place (own process): {out['saga_backlog']}", flush=True)
    with postgres_server(workdir, "split-paced", [*server_args, *SPLIT]) as (server, dbname):
        pid = server.worker_pids().get(0)  # the worker on the port
        out["place_half"] = paced_place(runner, server, params, half_rate, pid)
        out["place_half"]["backlog_after"] = pending_events(dbname)
    return out
