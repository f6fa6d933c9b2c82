"""Where a PlaceOrder's server CPU goes, layer by layer, beside the bare stack: `make bench-profile`.

Starts each server on a fresh PostgreSQL database (the bare stack, `orders-server` with the saga
off, `orders-server` with the saga on), drives closed-loop PlaceOrder from the benchmark's client
processes (or PlaceOrder paced at `--rate` calls per second: where the CPU goes below the peak),
and samples the server with py-spy (`--gil`: only the thread holding the GIL, so a sample is
Python work of the process, not a thread waiting on a socket). Each sample goes to the
layer of its innermost frame that belongs to one (see `LAYERS`); the layer's share of the samples
times the server's CPU per call (from /proc) is its cost per call, in milliseconds. The bare stack
has only the first rows (gRPC and threads, the driver): what is above them is ours.

Sampling sees Python frames only: C work is counted in the Python frame that called it (psycopg2's
`execute` in SQLAlchemy's `do_execute`, protobuf parsing in grpcio's deserializer). The shares are
of the GIL-holding time, which on this 2-core machine is close to the process's CPU time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import cpu, load, operations
from bench.plan import SKUS
from bench.server import BenchServer, bare_stack_server, postgres_server, stock_every_sku

# (layer, pattern on a frame's file): the first layer whose pattern matches a frame, walking from
# the innermost frame out, takes the sample. Standard-library frames match nothing (a `json.dumps`
# counts for whoever called it) except logging's and the thread pools', which are layers of their own.
LAYERS: tuple[tuple[str, str], ...] = (
    # psycopg2's execute is called from SQLAlchemy's `do_execute` or, on the unit of work's driver
    # path, from `db.driver.Session.run` (whose few Python lines count as the driver's too).
    ("driver (psycopg2, in C)", r"^sqlalchemy/engine/default\.py$|^db/driver\.py$"),
    ("driver wait callback (db/engine.py)", r"^db/engine\.py$"),
    ("logging", r"^logging/|^server/logs\.py$"),
    ("SQLAlchemy", r"^sqlalchemy/"),
    ("our database layer (db/)", r"^db/"),
    ("saga (saga/, pybreaker, limits, redis)", r"^(saga|pybreaker|limits|redis)[/.]"),
    ("application (application/, domain/)", r"^(application|domain)/"),
    (
        "servicers and mapping (server/servicers.py, server/mapping.py, protobuf)",
        r"^server/(servicers|mapping)\.py$|^google/protobuf/",
    ),
    (
        "interceptors, admission, metrics",
        r"^server/(interceptors|admission|metrics|auth|nonblocking)\.py$|^prometheus_client/",
    ),
    ("bare stack handler (bench/bare_stack.py)", r"^bench/bare_stack\.py$"),
    ("rest of the server (server/)", r"^server/"),
    ("gRPC (grpcio) and its threads", r"^grpc/|^concurrent/futures/|^threading\.py$"),
)
OTHER = "other"
_COMPILED = tuple((name, re.compile(pattern)) for name, pattern in LAYERS)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^)]*?)(?::\d+)?\)$")


def layer_of(stack: list[str]) -> str:
    """The layer of one sample, its frames outermost first (py-spy's `function (file:line)`, the
    file relative to its entry of sys.path)."""
    for frame in reversed(stack):
        match = _FRAME.match(frame)
        where = match.group("file") if match else frame
        for name, pattern in _COMPILED:
            if pattern.search(where):
                return name
    return OTHER


def shares(raw: str) -> dict[str, float]:
    """Share of the samples per layer, from py-spy's raw (collapsed stacks) output."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[layer_of(stack.split(";"))] += int(count)
    total = sum(counts.values())
    return {name: n / total for name, n in counts.most_common()} if total else {}


# The bench extra installs py-spy beside the interpreter (`make .venv/.installed-bench`).
PY_SPY = Path(sys.executable).parent / "py-spy"


@contextmanager
def sampled(pid: int, seconds: float, out: Path) -> Iterator[None]:
    """py-spy sampling `pid` for `seconds` (started now) into `out`, waited for at the end."""
    command = [str(PY_SPY), "record", "--pid", str(pid), "--duration"]
    command += [
        str(max(1, round(seconds))),
        "--rate",
        "250",
        "--gil",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-500:]}")


def profile(pool: Any, address: str, pid: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Place for the window, closed loop or paced at `--rate`, sampled; throughput, server CPU per
    call and the shares."""
    window = cpu.CpuWindow(pid, args.warmup + load.CONNECT_S + 1.0, args.duration - 2.0)
    with window, sampled(pid, args.duration - 1.0, out):
        result, seconds = load.run(
            pool,
            args.processes,
            address,
            operations.place_op,
            {"skus": SKUS},
            threads=args.threads,
            duration=args.duration,
            warmup=args.warmup,
            rate=args.rate,
        )
    row = load.summary(result, seconds, args.processes * args.threads)
    used = window.result()
    per_call_ms = 1000 * used["server_cores"] / row["per_s"] if row["per_s"] and used else 0.0
    return {
        "per_s": row["per_s"],
        "p99_ms": row["p99_ms"],
        "cpu_ms": per_call_ms,
        "shares": shares(out.read_text()),
    }


def profile_sqlite(
    pool: Any, args: argparse.Namespace, workdir: Path, server_args: list[str]
) -> dict[str, Any]:
    """The same on a fresh SQLite file, saga on."""
    with tempfile.TemporaryDirectory(prefix="orders-profile-") as tmp:
        server = BenchServer(f"sqlite:///{tmp}/orders.db", workdir / "server-sqlite.log", server_args)
        try:
            stock_every_sku(server)
            return profile(pool, server.address, server.proc.pid, args, workdir / "sqlite.txt")
        finally:
            server.stop()


def table(runs: dict[str, dict[str, Any]], how: str = "closed loop") -> str:
    names = list(runs)
    layers = [name for name, _ in LAYERS if any(name in run["shares"] for run in runs.values())]
    layers += [OTHER] if any(OTHER in run["shares"] for run in runs.values()) else []
    lines = [
        "| server CPU per call, ms (share) | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for layer in layers:
        cells = []
        for run in runs.values():
            share = run["shares"].get(layer, 0.0)
            cells.append(f"{share * run['cpu_ms']:.3f} ({share:.0%})" if share else "-")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines.append("| **all** | " + " | ".join(f"**{run['cpu_ms']:.3f}**" for run in runs.values()) + " |")
    lines.append(
        f"| calls/s ({how}) | " + " | ".join(f"{run['per_s']:.0f}" for run in runs.values()) + " |"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of load per server")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=16, help="threads per client process")
    parser.add_argument(
        "--sqlite", action="store_true", help="also PlaceOrder on SQLite (the embedded default)"
    )
    parser.add_argument(
        "--keep", type=Path, help="keep py-spy's samples (raw, collapsed stacks) in this folder"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="PlaceOrder calls per second, paced (default: a closed loop, each server at its peak)",
    )
    args = parser.parse_args()
    if not PY_SPY.exists():
        print("py-spy is missing: `make bench-profile` installs the bench extra", file=sys.stderr)
        return 2
    server_args = ["--max-concurrent-rpcs", "256"]
    runs: dict[str, dict[str, Any]] = {}
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bench-profile-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            pool.map(load.warm, range(args.processes))
            with bare_stack_server(workdir, "profile") as (bare, _):
                runs["bare stack"] = profile(pool, bare.address, bare.pids[0], args, workdir / "bare.txt")
            for label, extra in (("place, saga off", ["--saga-workers", "0"]), ("place, saga on", [])):
                with postgres_server(
                    workdir, label.replace(" ", "").replace(",", "-"), [*server_args, *extra]
                ) as (
                    server,
                    _,
                ):
                    runs[label] = profile(
                        pool, server.address, server.proc.pid, args, workdir / f"{label}.txt"
                    )
                print(
                    f"  {label}: {runs[label]['per_s']:.0f}/s, {runs[label]['cpu_ms']:.3f} ms per call",
                    flush=True,
                )
            if args.sqlite:
                runs["place on SQLite"] = profile_sqlite(pool, args, workdir, server_args)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(runs, f"paced at {args.rate:g}/s" if args.rate else "closed loop"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
