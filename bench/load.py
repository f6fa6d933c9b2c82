"""Load from separate client processes: closed loop, or paced at a fixed rate.

Each client process opens one gRPC channel and runs `threads` threads; each thread calls its
operation again as soon as the previous call ends (closed loop), so `processes * threads` calls are
in flight. With a `rate`, the same threads pace themselves instead (open loop): each call has a
scheduled start, and its latency counts from that schedule, so a slow server is not hidden by the
client waiting for it (no coordinated omission). Calls run from `start - warmup` to `end`; the
calls that end inside [`start`, `end`] count. The clock is `time.monotonic`, which
is system-wide on Linux, so every process measures against the same window.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from typing import Any

import grpc

# An operation factory builds, per thread, the callable that makes one call (or one flow). The
# callable returns an outcome tag (counted) or None. Factories must be module-level functions so
# that they can be sent to spawned processes.
# Time for the pool workers to connect before a scenario's warm-up starts.
CONNECT_S = 0.5
OpFactory = Callable[[grpc.Channel, random.Random, dict[str, Any]], Callable[[], str | None]]


@dataclass
class Job:
    address: str
    factory: OpFactory
    params: dict[str, Any]
    threads: int
    start: float
    end: float
    warmup: float
    max_calls: int = 0  # per thread; 0 = until `end`
    seed: int = 0
    rate: float = 0.0  # calls per second of each thread; 0 = closed loop
    channels: int = 1  # connections per process; threads share them round-robin


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, calls inside the window
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    calls: int = 0  # every completed call, window or not
    late_s: float = 0.0  # how late the latest client process was for its start (should be 0)

    def merge(self, other: Result) -> None:
        self.latencies.extend(other.latencies)
        self.outcomes.update(other.outcomes)
        self.errors.update(other.errors)
        self.calls += other.calls
        self.late_s = max(self.late_s, other.late_s)


def _thread(job: Job, op: Callable[[], str | None], out: Result, lock: threading.Lock) -> None:
    local = Result()
    interval = 1.0 / job.rate if job.rate else 0.0
    scheduled = time.monotonic() + random.random() * interval  # spread the threads' phases
    while job.max_calls == 0 or local.calls < job.max_calls:
        if interval:
            time.sleep(max(0.0, scheduled - time.monotonic()))
            began, scheduled = scheduled, scheduled + interval
        else:
            began = time.monotonic()
        if began >= job.end:
            break
        try:
            outcome = op()
        except grpc.RpcError as error:
            code = error.code()
            local.errors[code.name if code else "UNKNOWN"] += 1
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                time.sleep(0.001)
            continue
        except Exception as error:  # a bug in the scenario or an unexpected reply
            local.errors[f"client:{type(error).__name__}:{error}"[:120]] += 1
            continue
        ended = time.monotonic()
        local.calls += 1
        if job.start <= ended <= job.end:
            local.latencies.append(ended - began)
            if outcome:
                local.outcomes[outcome] += 1
        elif job.max_calls and outcome:
            local.outcomes[outcome] += 1  # counted runs keep every outcome, for correctness checks
    with lock:
        out.merge(local)


def client_process(job: Job) -> Result:
    """One client process: `job.channels` channels (each its own connection: a server of several
    `--workers` gets connections, not calls, spread over it), `job.threads` closed-loop threads;
    runs in a pool worker."""
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(job.address, options=options) for _ in range(job.channels)]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        result = Result()
        lock = threading.Lock()
        ops = [
            job.factory(channels[i % len(channels)], random.Random(job.seed * 1000 + i), job.params)
            for i in range(job.threads)
        ]
        # Wait for the common start (minus warm-up) so every process begins at once.
        result.late_s = max(0.0, time.monotonic() - (job.start - job.warmup))
        time.sleep(max(0.0, job.start - job.warmup - time.monotonic()))
        workers = [threading.Thread(target=_thread, args=(job, op, result, lock), daemon=True) for op in ops]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return result
    finally:
        for channel in channels:
            channel.close()


def run(
    pool: Pool,
    processes: int,
    address: str,
    factory: OpFactory,
    params: dict[str, Any],
    *,
    threads: int,
    duration: float,
    warmup: float,
    max_calls: int = 0,
    rate: float = 0.0,
    channels: int = 1,
) -> tuple[Result, float]:
    """Run one scenario; returns the merged result and the measured window in seconds.

    `rate` (calls per second in all) paces the calls instead of the closed loop."""
    start = time.monotonic() + warmup + CONNECT_S
    end = start + duration
    jobs = [
        Job(
            address,
            factory,
            params,
            threads,
            start,
            end,
            warmup,
            max_calls,
            n + 1,
            rate / (processes * threads),
            channels,
        )
        for n in range(processes)
    ]
    result = Result()
    for part in pool.map(client_process, jobs):
        result.merge(part)
    finished = time.monotonic()
    # A counted run (max_calls) may end before `end`: the window is what it actually took.
    window = min(end, finished) - start
    return result, window


def warm(_: int) -> int:
    """A no-op task: run a few through a fresh pool so its processes have imported grpc."""
    time.sleep(0.2)
    return 0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summary(result: Result, window: float, in_flight: int) -> dict[str, Any]:
    values = sorted(result.latencies)
    return {
        "in_flight": in_flight,
        "window_s": round(window, 3),
        "completed": len(values),
        "per_s": round(len(values) / window, 1) if window > 0 else 0.0,
        "p50_ms": round(percentile(values, 0.50) * 1000, 2),
        "p95_ms": round(percentile(values, 0.95) * 1000, 2),
        "p99_ms": round(percentile(values, 0.99) * 1000, 2),
        "outcomes": dict(result.outcomes),
        "errors": dict(result.errors),
        "late_s": round(result.late_s, 3),
    }
