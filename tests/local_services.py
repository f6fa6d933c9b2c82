"""What the tests and the benchmark both need: `orders-server` processes, throwaway PostgreSQL databases.

Imports no service code and no gRPC (the benchmark's own process does without them): the standard
library, psycopg2, and SQLAlchemy for its URL parser only.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
from sqlalchemy.engine import make_url

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
# The line `orders-server` logs once it accepts calls (server/main.py); the port is the bound one.
READY = re.compile(r"orders-server ready on (?P<host>\S+):(?P<port>\d+)")


def wait_until(
    predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate!r} (last: {last!r})")


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago (for a flag that does not take 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports on 127.0.0.1 that nothing used a moment ago: a
    supervisor gives its process `i` the metrics port + `i`, and the port after a free one is often
    an ephemeral port some connection holds."""
    for _ in range(100):
        first = free_port()
        if all(_bindable(first + offset) for offset in range(1, count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def signal_another_thread(pid: int, sig: int) -> None:
    """Send `sig` to a thread of process `pid` other than its main one (tgkill), as the kernel may
    deliver a signal sent to the process."""
    other = next(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
    if ctypes.CDLL(None, use_errno=True).tgkill(pid, other, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {other}) failed")


def server_command() -> list[str]:
    """`orders-server` as the README installs it (the venv's console script)."""
    script = Path(sys.executable).parent / "orders-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.main"]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its ORDERS_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    # Without the installed console script the server runs as `python -m server.main` from the repo.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["ORDERS_TESTING_FAULTS"] = "1"  # test servers may take --fault-file (server.faults)
    env.update(extra or {})
    return env


WORKER_STARTED = re.compile(r"worker (?P<index>\d+) started \(pid (?P<pid>\d+)\)")
# A saga step's line from a supervisor's worker (`[worker-1/saga_3] orders.saga ...`).
WORKER_SAGA_LINE = re.compile(r"\[worker-(\d+)/saga_\d+\] orders\.saga ")


def log_since(path: Path, offset: int) -> str:
    """What was written to the log at `path` from byte `offset` on (a log appended to across starts)."""
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


class OrdersServer:
    """A real `orders-server` process, started and waited for until its ready line; its output (the
    log) goes to a file that `log()` reads."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str], cwd: Path, log_path: Path, ready_timeout: float = 30
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        # A log path may be reused (appended to across restarts): only this process's ready line counts.
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(
            [*server_command(), *args], env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT
        )
        match = wait_until(self._ready, timeout=ready_timeout, what="the ready line")
        self.port = int(match.group("port"))
        self.address = f"127.0.0.1:{self.port}"

    def _ready(self) -> re.Match[str] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"orders-server exited with {self.proc.returncode}:\n{self.log()}")
        return READY.search(log_since(self.log_path, self._log_start))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> dict[int, int]:
        """A supervisor's workers (`--workers`, `--saga-processes`): the latest pid of each, by
        index, from its `worker I started (pid P)` lines."""
        return {int(m.group("index")): int(m.group("pid")) for m in WORKER_STARTED.finditer(self.log())}

    def workers_running_sagas(self) -> set[int]:
        """The indexes of a supervisor's workers that logged a saga step."""
        return {int(index) for index in WORKER_SAGA_LINE.findall(self.log())}

    def restarted(self, index: int, old_pid: int) -> int | None:
        """Worker `index`'s pid once a process other than `old_pid` has taken its place and written
        its ready line (`worker I (pid P) ready on`, any role); None until then."""
        pid = self.worker_pids().get(index)
        if pid is None or pid == old_pid or f"worker {index} (pid {pid}) ready on" not in self.log():
            return None
        return pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the process, kill it if it is still running after `timeout`; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def pg_connect(url: str, *, autocommit: bool = False) -> Any:
    """A plain psycopg2 connection to the database of a SQLAlchemy URL (ours, not the server's)."""
    parsed = make_url(url)
    connection = psycopg2.connect(
        host=parsed.host,
        port=parsed.port or 5432,
        user=parsed.username,
        password=parsed.password,
        dbname=parsed.database,
        connect_timeout=5,
    )
    connection.autocommit = autocommit
    return connection


def with_database(url: str, name: str) -> str:
    """`url` with its database replaced by `name` (same server, same user)."""
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def create_database(admin_url: str, prefix: str) -> str:
    """A new, empty database on the server of `admin_url`, named `prefix` and a random suffix; its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with closing(pg_connect(admin_url, autocommit=True)) as admin, admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_databases(admin_url: str, names: Iterable[str]) -> None:
    """Drop each database, closing whatever connections are still open on it."""
    with closing(pg_connect(admin_url, autocommit=True)) as admin, admin.cursor() as cursor:
        for name in names:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
