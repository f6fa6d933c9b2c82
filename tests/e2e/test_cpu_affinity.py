"""`--cpu-affinity` on real `orders-server` processes: where every thread of each process may run
(Linux keeps it per thread, in /proc/PID/task/TID/status), and the guard that lets a process
pinned by `auto` go once other work crowds its CPU (server/affinity.py, docs/operations.md).

The test process itself is not pinned: what it may run on is what a server started from it may use.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server import affinity
from tests.local_services import wait_until
from tests.support import ServerProcess

pytestmark = pytest.mark.e2e

FAST = ("--poll-interval-s", "0.2", "--health-interval-s", "0.2", "--grace-period-s", "2")


def thread_cpus(pid: int) -> set[str]:
    """The CPU lists of every thread of `pid`, as the kernel words them (`0-1`, `1`)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        found.add(re.search(r"^Cpus_allowed_list:\s*(\S+)$", status, re.M).group(1))  # type: ignore[union-attr]
    return found


ALLOWED = affinity.allowed_cpus()


def auto_choice(index: int) -> str:
    """What `auto` gives process `index` of a server started from this process, in the kernel's words."""
    chosen = affinity.choose("auto", ALLOWED, index)
    return affinity.describe(chosen if chosen is not None else ALLOWED)


def test_a_server_with_the_defaults_runs_every_thread_on_one_cpu_and_says_which(
    spawn_server: Callable[..., ServerProcess],
) -> None:
    server = spawn_server(*FAST)
    server.stubs.set_stock("AFF-1", 5)
    server.stubs.place("c1", [("AFF-1", 1)])  # threads of every kind have started by now
    assert thread_cpus(server.proc.pid) == {auto_choice(0)}
    assert f"orders-server runs on CPUs {auto_choice(0)} (--cpu-affinity auto)" in server.log()


def test_none_leaves_every_thread_free_and_a_list_pins_them_to_it(
    spawn_server: Callable[..., ServerProcess],
) -> None:
    free = spawn_server("--cpu-affinity", "none", *FAST)
    free.stubs.set_stock("AFF-1", 5)
    assert thread_cpus(free.proc.pid) == {affinity.describe(ALLOWED)}
    first = min(ALLOWED)
    listed = spawn_server("--cpu-affinity", str(first), *FAST)
    listed.stubs.set_stock("AFF-1", 5)
    assert thread_cpus(listed.proc.pid) == {str(first)}
    assert f"runs on CPUs {first} (--cpu-affinity {first})" in listed.log()


@pytest.mark.postgres
def test_the_workers_of_a_pool_take_a_cpu_each_and_the_supervisor_none(
    make_pg_database: Callable[[], str], spawn_server: Callable[..., ServerProcess]
) -> None:
    url = make_pg_database()
    server = spawn_server("--workers", "2", "--database-url", url, "--migrate-on-start", "always", *FAST)
    pids = server.worker_pids()
    assert thread_cpus(server.proc.pid) == {affinity.describe(ALLOWED)}  # the supervisor
    assert thread_cpus(pids[0]) == {auto_choice(0)}
    assert thread_cpus(pids[1]) == {auto_choice(1)}
    if len(ALLOWED) >= 2:
        assert auto_choice(0) != auto_choice(1)


@pytest.fixture
def spinners() -> Iterator[Callable[[int, int], None]]:
    """Factory: `count` processes that spin on CPU `cpu` until the test ends."""
    started: list[subprocess.Popen[bytes]] = []

    def spin(cpu: int, count: int) -> None:
        code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
        started.extend(subprocess.Popen([sys.executable, "-c", code]) for _ in range(count))

    yield spin
    for process in started:
        process.kill()
        process.wait()


def test_a_server_whose_cpu_other_work_crowds_is_let_go_with_a_warning(
    spawn_server: Callable[..., ServerProcess], spinners: Callable[[int, int], None]
) -> None:
    """Another server (or anything pinned) on the CPU `auto` chose: the guard sees the CPU busy
    with work that is not the server's in two readings in a row, and lets every thread of the
    server run on any CPU again."""
    if len(ALLOWED) < 2:
        # Nothing to choose from, so nothing was pinned: the server runs where it may.
        server = spawn_server(*FAST)
        assert thread_cpus(server.proc.pid) == {affinity.describe(ALLOWED)}
        return
    server = spawn_server(*FAST)
    server.stubs.set_stock("AFF-1", 5)
    (cpu,) = affinity.choose("auto", ALLOWED, 0) or {0}
    assert thread_cpus(server.proc.pid) == {str(cpu)}
    spinners(cpu, 2)
    wait_until(
        lambda: thread_cpus(server.proc.pid) == {affinity.describe(ALLOWED)},
        timeout=30,
        interval=0.5,
        what="the server's threads let go of their CPU",
    )
    assert f"CPU {cpu} is busy with other work" in server.log()
    # It serves on, wherever it runs now.
    assert server.stubs.place("c1", [("AFF-1", 1)]).order_id
