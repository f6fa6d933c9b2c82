"""Where a server's CPU and context switches go, thread by thread, per PlaceOrder (or per flow).

    .venv/bin/python -m bench.threads --rate 230
    .venv/bin/python -m bench.threads --rate 230 --server-arg=--cpu-affinity=none
    .venv/bin/python -m bench.threads --flow

Starts `orders-server` on a fresh PostgreSQL database (the benchmark's `postgres_server`), drives
it with the benchmark's client processes (PlaceOrder paced at `--rate` calls per second, closed
loop without it, or closed-loop flow with `--flow`), and reads /proc before and after: each
thread's user and system CPU and its voluntary and involuntary context switches, summed by kind
of thread (`grpc_N` handler threads, `saga_N` workers, grpcio's `_serve` polling thread, ...:
names from `py-spy dump`), divided by the calls made. A voluntary switch is a thread going to
sleep (a database wait, a lock, the interpreter lock held by another thread), an involuntary one
the kernel taking the CPU from it. docs/performance.md, "Twelfth round", tells what they showed.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import operations
from bench.plan import SKUS
from bench.profile import PY_SPY
from bench.runner import Runner
from bench.server import postgres_server


@dataclass(frozen=True)
class Task:
    """One thread's counters from /proc/PID/task/TID (CPU in clock ticks)."""

    name: str
    user: int
    system: int
    voluntary: int
    involuntary: int


def tasks(pid: int) -> dict[str, Task]:
    """Every thread of `pid` now, by thread id (a thread that ends meanwhile is left out)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        switches = dict(re.findall(r"^(\w*voluntary_ctxt_switches):\s*(\d+)", status, re.M))
        found[task.name] = Task(
            name=stat[stat.index("(") + 1 : stat.rindex(")")],
            user=int(fields[11]),
            system=int(fields[12]),
            voluntary=int(switches.get("voluntary_ctxt_switches", 0)),
            involuntary=int(switches.get("nonvoluntary_ctxt_switches", 0)),
        )
    return found


def thread_names(pid: int) -> dict[str, str]:
    """Python's names of the threads of `pid`, by thread id (`py-spy dump`; empty without py-spy)."""
    try:
        command = [str(PY_SPY), "dump", "--pid", str(pid)]
        dump = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"^Thread (\d+) \(\w+\): \"([^\"]*)\"", dump, re.M))


def kind(name: str) -> str:
    """`grpc_3` -> `grpc_N`, `dispatcher-round_1` -> `dispatcher-round_N`."""
    return re.sub(r"[_-]?\d+$", "_N", name)


def per_kind(before: dict[str, Task], after: dict[str, Task], names: dict[str, str]) -> dict[str, list[int]]:
    """CPU ticks (user, system), switches (voluntary, involuntary) and threads, summed by kind."""
    sums: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0, 0])
    for tid, end in after.items():
        start = before.get(tid, Task(end.name, 0, 0, 0, 0))
        row = sums[kind(names.get(tid, end.name))]
        row[0] += end.user - start.user
        row[1] += end.system - start.system
        row[2] += end.voluntary - start.voluntary
        row[3] += end.involuntary - start.involuntary
        row[4] += 1
    return sums


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.0, help="PlaceOrder calls/s (0: closed loop)")
    parser.add_argument("--flow", action="store_true", help="closed-loop flow (place, WatchOrder)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of measured load")
    parser.add_argument("--server-arg", action="append", default=[], help="an orders-server flag (repeated)")
    args = parser.parse_args()
    hz = os.sysconf("SC_CLK_TCK")
    params = {"skus": SKUS}
    server_args = ["--max-concurrent-rpcs", "256", *args.server_arg]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        runner = Runner(pool, 2, 16, args.duration, 1.0)
        with postgres_server(Path(tempfile.mkdtemp(prefix="bench-threads-")), "threads", server_args) as (
            server,
            _,
        ):
            pid = server.proc.pid
            # Counted over the part the benchmark's CPU window counts, calls at the run's rate.
            snapshots: list[dict[str, Task]] = []
            began, span = runner.measured_part()

            def snapshot() -> None:
                time.sleep(began)
                snapshots.append(tasks(pid))
                time.sleep(span)
                snapshots.append(tasks(pid))

            counter = threading.Thread(target=snapshot, daemon=True)
            counter.start()
            if args.flow:
                row = runner.scenario("flow", server.address, operations.flow_op, params)
            else:
                row = runner.scenario("place", server.address, operations.place_op, params, rate=args.rate)
            counter.join()
            names = thread_names(pid)
    before, after = snapshots
    calls = max(float(row["per_s"]) * span, 1.0)
    what = "flow" if args.flow else "PlaceOrder"
    print(f"per {what} ({row['per_s']:.0f}/s, p99 {row['p99_ms']} ms; {calls:.0f} in {span:.0f} s counted):")
    print("| threads | count | CPU ms (user + system) | voluntary switches | involuntary switches |")
    print("| --- | ---: | ---: | ---: | ---: |")

    def ms(ticks: int) -> float:
        return float(1000 * ticks / hz / calls)

    totals = [0, 0, 0, 0]
    by_kind = per_kind(before, after, names)
    for name, (user, system, voluntary, involuntary, threads) in sorted(
        by_kind.items(), key=lambda item: -(item[1][0] + item[1][1])
    ):
        totals = [totals[0] + user, totals[1] + system, totals[2] + voluntary, totals[3] + involuntary]
        if user + system or voluntary:
            print(
                f"| {name} | {threads} | {ms(user + system):.3f} ({ms(user):.3f} + {ms(system):.3f}) "
                f"| {voluntary / calls:.1f} | {involuntary / calls:.1f} |"
            )
    print(f"| all | | {ms(totals[0] + totals[1]):.3f} | {totals[2] / calls:.1f} | {totals[3] / calls:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
