"""The bare stack (bench/bare_stack.py) under the same load as PlaceOrder: its closed-loop peak, its
latency paced at the rate of PlaceOrder's half-peak row, and its peak with N processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import operations
from bench.plan import SKUS
from bench.runner import Runner
from bench.server import bare_stack_rows, bare_stack_server


def run_bare_stack(runner: Runner, workdir: Path, half_rate: float) -> dict[str, Any]:
    """Closed loop, then paced at `half_rate` (PlaceOrder's half-peak rate), on one process and a
    fresh database; the CPU of each, and the rows inserted (warm-ups' calls included)."""
    out: dict[str, Any] = {}
    params = {"skus": SKUS}
    with bare_stack_server(workdir, "one") as (server, dbname):
        pid = server.pids[0]
        with runner.cpu_window(pid) as window:
            out["peak"] = runner.scenario("bare stack", server.address, operations.place_op, params)
        out["peak"]["cpu"] = window.result()
        with runner.cpu_window(pid) as window:
            out["half"] = runner.scenario(
                "bare stack at PlaceOrder's half-peak rate",
                server.address,
                operations.place_op,
                params,
                rate=half_rate,
            )
        out["half"]["cpu"] = window.result()
        print(f"  bare stack cpu: peak {out['peak']['cpu']}; half {out['half']['cpu']}", flush=True)
        out["rows"] = bare_stack_rows(dbname)
        out["server_log_errors"] = server.log_errors()
        out["server_exit"] = server.stop()
    return out


def run_processes(runner: Runner, workdir: Path, count: int) -> dict[str, Any]:
    """Closed loop against `count` bare-stack processes on one port, each client thread on its own
    connection (as the `--workers N` rows of the service)."""
    params = {"skus": SKUS}
    with bare_stack_server(workdir, f"processes-{count}", count) as (server, _):
        label = f"bare stack, {count} process(es)"
        row = runner.scenario(label, server.address, operations.place_op, params, channels=runner.threads)
        row["server_exit"] = server.stop()
    return row
