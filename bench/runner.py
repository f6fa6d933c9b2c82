"""The scenario runner: one measured load against a server from the pool of client processes."""

from __future__ import annotations

from multiprocessing.pool import Pool
from typing import Any

from bench import cpu, load


class Runner:
    """Runs each scenario with the same client processes, threads per process, measured window and
    warm-up; prints each scenario's row as it ends."""

    def __init__(self, pool: Pool, processes: int, threads: int, duration: float, warmup: float) -> None:
        self.pool = pool
        self.processes = processes
        self.threads = threads
        self.duration = duration
        self.warmup = warmup

    @property
    def in_flight(self) -> int:
        return self.processes * self.threads

    def scenario(
        self,
        name: str,
        address: str,
        factory: load.OpFactory,
        params: dict[str, Any],
        max_calls: int = 0,
        rate: float = 0.0,
        channels: int = 1,
    ) -> dict[str, Any]:
        """Closed loop for the window, or `max_calls` per thread, or paced at `rate` calls per
        second in all; the summary row (throughput, latency percentiles, outcomes, errors)."""
        duration = self.duration * 3 if max_calls else self.duration  # a counted run gets a cap
        result, window = load.run(
            self.pool,
            self.processes,
            address,
            factory,
            params,
            threads=self.threads,
            duration=duration,
            warmup=0.0 if max_calls else self.warmup,
            max_calls=max_calls,
            rate=rate,
            channels=channels,
        )
        row = load.summary(result, window, self.in_flight)
        if rate:
            row["offered_per_s"] = round(rate, 1)
        print(f"  {name}: {row}", flush=True)
        return row

    def measured_part(self) -> tuple[float, float]:
        """When to start counting in the next scenario, and for how long (seconds): from a second
        after its warm-up to a second before its end, connects and warm-up left out."""
        return load.CONNECT_S + self.warmup + 1.0, max(self.duration - 2.0, 1.0)

    def cpu_window(self, pid: int) -> cpu.CpuWindow:
        """CPU over the measured part of the next (uncounted) scenario (`measured_part`)."""
        return cpu.CpuWindow(pid, *self.measured_part())
