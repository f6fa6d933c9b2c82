"""Scaling with `--workers N`: baseline, place and (full run) flow against N server processes, each N
followed by the bare stack with N processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import operations
from bench.load import OpFactory
from bench.plan import SKUS
from bench.runner import Runner
from bench.scenarios import bare_stack
from bench.server import postgres_server


def run_workers(runner: Runner, workdir: Path, args: list[str], plan: dict[str, Any]) -> dict[str, Any]:
    """Baseline, place and (full run) flow against `--workers N` for each N, fresh database each.

    Every client thread has its own connection here (the kernel spreads connections, not calls,
    over the workers' sockets), for N = 1 as well, so the rows compare like with like."""
    out: dict[str, Any] = {}
    params = {"skus": SKUS}
    # Flow before place: place outruns the saga and leaves a backlog that flow would wait behind.
    chosen: list[tuple[str, OpFactory, dict[str, Any]]] = [("baseline", operations.health_op, {})]
    if plan["workers_flow"]:
        chosen.append(("flow", operations.flow_op, params))
    chosen.append(("place", operations.place_op, params))
    for count in plan["workers"]:
        with postgres_server(workdir, f"workers-{count}", [*args, "--workers", str(count)]) as (server, _):
            row: dict[str, Any] = {}
            for name, factory, op_params in chosen:
                label, threads = f"{name}, --workers {count}", runner.threads
                row[name] = runner.scenario(label, server.address, factory, op_params, channels=threads)
            row["server_log_errors"] = server.log_errors()
            row["server_exit"] = server.stop()
        row["bare_stack"] = bare_stack.run_processes(runner, workdir, count)
        out[str(count)] = row
    return out
