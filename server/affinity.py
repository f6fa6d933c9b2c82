"""Which CPUs a server process runs on: `--cpu-affinity` (auto, none, or a list such as 0,2-3).

CPython runs one thread's Python at a time (the GIL), so a server process never uses much more
than one core, however many it may run on. Left to the scheduler, its threads spread over every
core: a thread that returns from the database on one core finds the interpreter held by a thread
on another, sleeps, and is woken by a signal from that core once it is let go. On the benchmark
machine that was much of the server's context switches and CPU per order, and PlaceOrder's tail
(docs/performance.md, "Twelfth round", has the figures). With every thread of the process on one
core, a thread that returns from the database waits in that core's run queue instead, and takes
the interpreter when the holder lets it go: no wake-up across cores.

`auto` (the default) pins each process of the server to one CPU of those it may use: a lone
server to the last (CPU 0 tends to take more of the machine's interrupts), worker i of a
`--workers` pool (or saga process) to the i-th from the end, so that the processes of one
server never share a CPU while there are enough. Independent servers on one host do not know of
each other and may pick the same CPU: the guard (`AffinityGuard`) watches the CPU, and once it is
busy with work that is mostly not this process's, it lets the process run anywhere again, for
good, with a warning. An explicit list is the operator's choice and is kept; `none` leaves the
scheduler free.

The affinity is set before the process starts any thread (threads take their creator's), and the
guard widens it thread by thread (Linux keeps it per thread).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("orders.server")

AUTO = "auto"
NONE = "none"
_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


class AffinityError(ValueError):
    """A `--cpu-affinity` value that is not auto, none or a CPU list this process may use."""


def parse_cpus(value: str) -> frozenset[int]:
    """`0,2-3` -> {0, 2, 3}; AffinityError for anything else (an empty or reversed range too)."""
    text = value.replace(" ", "")
    if not _LIST.fullmatch(text):
        raise AffinityError(f"{value!r} is not auto, none or a CPU list such as 0,2-3")
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if high < low:
            raise AffinityError(f"{part!r}: a range goes from the lower CPU to the higher")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def can_pin() -> bool:
    """This platform sets CPU affinity (Linux does; macOS does not)."""
    return hasattr(os, "sched_setaffinity")


def allowed_cpus() -> frozenset[int]:
    """The CPUs this process may run on now (its cgroup's cpuset, taskset, ...)."""
    if not can_pin():
        return frozenset(range(os.cpu_count() or 1))
    return frozenset(os.sched_getaffinity(0))


def check(value: str, allowed: frozenset[int]) -> list[str]:
    """Problems with a `--cpu-affinity` value, for the settings' checks."""
    if value in (AUTO, NONE):
        return []
    try:
        cpus = parse_cpus(value)
    except AffinityError as error:
        return [f"--cpu-affinity: {error}"]
    if not can_pin():
        return ["--cpu-affinity: this platform cannot pin a process to CPUs; use auto or none"]
    outside = sorted(cpus - allowed)
    if outside:
        return [f"--cpu-affinity: CPU {outside[0]} is not one this process may run on ({describe(allowed)})"]
    return []


def choose(value: str, allowed: frozenset[int], index: int = 0) -> frozenset[int] | None:
    """The CPUs for process `index` of a server (0 for a lone one), or None to leave them as they
    are: `auto` is the index-th CPU from the end of `allowed`, round the set again past its size."""
    if value == NONE or not can_pin():
        return None
    if value != AUTO:
        return parse_cpus(value)
    ordered = sorted(allowed)
    if len(ordered) < 2:
        return None  # one CPU: nothing to choose
    return frozenset({ordered[-1 - index % len(ordered)]})


def describe(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5'."""
    ordered = sorted(cpus)
    runs: list[str] = []
    start = previous = None
    for cpu in [*ordered, None]:
        if cpu is not None and previous is not None and cpu == previous + 1:
            previous = cpu
            continue
        if start is not None:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = cpu
    return ",".join(runs)


def pin(value: str, index: int = 0) -> AffinityGuard | None:
    """Pin this process as `value` says (call it before any thread starts); the guard to start once
    the server runs, when the choice was `auto`."""
    allowed = allowed_cpus()
    cpus = choose(value, allowed, index)
    if cpus is None or cpus == allowed:
        return None
    os.sched_setaffinity(0, cpus)
    if value != AUTO:
        return None
    (cpu,) = cpus
    return AffinityGuard(cpu, allowed)


def set_for_every_thread(cpus: frozenset[int], tasks: Path = Path("/proc/self/task")) -> None:
    """Every thread of this process may run on `cpus` (a thread that ends meanwhile is skipped).
    Passes until one finds no thread it has not set: a thread started during a pass takes its
    creator's affinity, which may not have been set yet."""
    done: set[str] = set()
    while fresh := [task for task in tasks.iterdir() if task.name not in done]:
        for task in fresh:
            done.add(task.name)
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except (ProcessLookupError, FileNotFoundError):
                continue


@dataclass(frozen=True)
class Reading:
    """What the guard reads at one moment: the CPU's busy and total time (from /proc/stat, in clock
    ticks) and this process's CPU time (from /proc/self/stat, in ticks)."""

    cpu_busy: int
    cpu_total: int
    own: int


def crowded(before: Reading, after: Reading, busy_share: float = 0.9, own_share: float = 0.5) -> bool:
    """Between two readings, the CPU was busy nearly all the time (`busy_share` of it or more) and
    less than `own_share` of that was this process: other work crowds it out."""
    total = after.cpu_total - before.cpu_total
    busy = after.cpu_busy - before.cpu_busy
    if total <= 0 or busy < busy_share * total:
        return False
    return after.own - before.own < own_share * busy


def read(cpu: int, stat: Path = Path("/proc/stat"), own: Path = Path("/proc/self/stat")) -> Reading | None:
    """The guard's reading for `cpu`, or None where /proc does not show it (a container whose
    /proc/stat numbers its CPUs differently)."""
    try:
        fields = next(
            line.split()[1:] for line in stat.read_text().splitlines() if line.startswith(f"cpu{cpu} ")
        )
        mine = own.read_text().rsplit(")", 1)[1].split()
    except (OSError, StopIteration, IndexError):
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle and iowait
    return Reading(cpu_busy=sum(ticks) - idle, cpu_total=sum(ticks), own=int(mine[11]) + int(mine[12]))


class AffinityGuard:
    """Lets a process that `auto` pinned run anywhere again once its CPU is crowded by other work
    in `windows` readings in a row, `interval_s` apart: then the choice was a bad one (another
    server picked the same CPU, or something pinned itself there), and the scheduler can do better."""

    def __init__(
        self,
        cpu: int,
        allowed: frozenset[int],
        interval_s: float = 5.0,
        windows: int = 2,
        reader: Callable[[int], Reading | None] = read,
        widen: Callable[[frozenset[int]], None] = set_for_every_thread,
    ) -> None:
        self.cpu = cpu
        self.allowed = allowed
        self._interval_s = interval_s
        self._windows = windows
        self._reader = reader
        self._widen = widen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-affinity-guard", daemon=True)
        self.widened = threading.Event()

    def start(self) -> None:
        if self._reader(self.cpu) is None:
            log.warning("CPU %d's load is not readable here; pinned without a guard", self.cpu)
            return
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        previous = self._reader(self.cpu)
        in_a_row = 0
        if previous is None:
            return
        while not self._stop.wait(self._interval_s):
            current = self._reader(self.cpu)
            if current is None:
                return
            in_a_row = in_a_row + 1 if crowded(previous, current) else 0
            previous = current
            if in_a_row >= self._windows:
                self._widen(self.allowed)
                self.widened.set()
                log.warning(
                    "CPU %d is busy with other work (--cpu-affinity auto pinned this process to it); "
                    "the process may now run on CPUs %s",
                    self.cpu,
                    describe(self.allowed),
                )
                return
