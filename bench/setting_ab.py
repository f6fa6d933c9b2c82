"""One server setting, several values, alternated: closed-loop flow orders/s and the p99 of
PlaceOrder paced at a fixed rate, each on a fresh server and database per run.

    .venv/bin/python -m bench.setting_ab --flag saga-workers --values 8,4,2 --rate 260 --rounds 3

The order of the values is reversed every other round, so that a machine that speeds up or slows
down during the run does not favour one value (docs/performance.md, "Sixth round").
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
from pathlib import Path

from bench import load, operations
from bench.plan import SKUS
from bench.runner import Runner
from bench.server import postgres_server


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.setting_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--flag", required=True, help="an orders-server flag, without its dashes")
    parser.add_argument("--values", required=True, help="comma-separated values of the flag")
    parser.add_argument("--rate", type=float, default=260.0, help="PlaceOrder calls per second, paced")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measured run")
    args = parser.parse_args()
    values = args.values.split(",")
    flows: dict[str, list[float]] = {value: [] for value in values}
    tails: dict[str, list[float]] = {value: [] for value in values}
    workdir = Path(tempfile.mkdtemp(prefix="setting-ab-"))
    params = {"skus": SKUS}
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(load.warm, range(2))
        runner = Runner(pool, 2, 16, args.duration, 1.0)
        for round_ in range(args.rounds):
            for value in values if round_ % 2 == 0 else values[::-1]:
                server_args = ["--max-concurrent-rpcs", "256", f"--{args.flag}", value]
                with postgres_server(workdir, f"{value}-{round_}-flow", server_args) as (server, _):
                    flow = runner.scenario("flow", server.address, operations.flow_op, params)
                with postgres_server(workdir, f"{value}-{round_}-paced", server_args) as (server, _):
                    paced = runner.scenario(
                        "place paced", server.address, operations.place_op, params, rate=args.rate
                    )
                flows[value].append(flow["per_s"])
                tails[value].append(paced["p99_ms"])
    print(f"--{args.flag}: flow orders/s (closed loop); PlaceOrder p99 ms at {args.rate:g}/s")
    for value in values:
        flow_runs = ", ".join(f"{x:.0f}" for x in flows[value])
        tail_runs = ", ".join(f"{x:.1f}" for x in tails[value])
        print(
            f"{value}: flow {flow_runs} (median {statistics.median(flows[value]):.0f}); "
            f"p99 {tail_runs} (median {statistics.median(tails[value]):.1f})"
        )
    print(f"server logs: {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
