"""The server under test: one `orders-server` process, its metrics and memory, and its database."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from bench import operations
from bench.bare_stack import READY_LINE, TABLE
from bench.plan import PG_ADMIN_URL, SKUS
from tests.local_services import (
    ROOT,
    OrdersServer,
    create_database,
    drop_databases,
    free_port,
    free_ports,
    log_since,
    pg_connect,
    server_command,
    server_env,
    wait_until,
    with_database,
)


class BenchServer(OrdersServer):
    """One `orders-server` process on port 0, with its metrics on a port of its own; its log goes to
    a file."""

    def __init__(self, database_url: str, log_path: Path, extra_args: list[str]) -> None:
        # A run of ports: with --workers or --saga-processes, process i serves its metrics on the
        # port + i (the benchmark's largest pool is 3 workers, or 1 worker and a saga process).
        self.metrics_port = free_ports(4)
        args = ["--port", "0", "--metrics-port", str(self.metrics_port), *extra_args]
        env = server_env({"ORDERS_DATABASE_URL": database_url})
        super().__init__(args, env, ROOT, log_path, ready_timeout=60)

    def metrics(self) -> dict[str, float]:
        """The Prometheus samples, keyed by the sample's name and labels."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def memory_kb(self) -> dict[str, int]:
        """VmHWM (peak RSS) and VmRSS of the server process, in kB."""
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                fields[name] = int(value.split()[0])
        return fields

    def log_errors(self) -> list[str]:
        """The first lines of the log that report an error."""
        marks = (" ERROR ", '"level": "ERROR"', "Traceback")
        return [line for line in self.log().splitlines() if any(mark in line for mark in marks)][:20]


def histogram(
    before: dict[str, float], after: dict[str, float], name: str, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Percentiles of what a Prometheus histogram saw between two scrapes (the label sets that carry
    every one of `labels`, summed), interpolated linearly inside its buckets (so only as fine as
    the buckets: 1, 2.5, 5, 10, 25 ms...)."""
    buckets: dict[float, float] = {}
    wanted = (labels or {}).items()
    for key, value in after.items():
        match = re.fullmatch(name + r"_bucket\{(.*)\}", key)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if "le" in found and all(found.get(k) == v for k, v in wanted):
            bound = float(found["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value - before.get(key, 0.0)
    bounds = sorted(buckets)
    total = buckets.get(float("inf"), 0.0)
    out: dict[str, Any] = {"count": int(total)}
    for label, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
        if not total:
            out[label] = None
            continue
        target, lower, below = q * total, 0.0, 0.0
        for bound in bounds:
            if buckets[bound] >= target:
                if bound == float("inf"):
                    out[label] = f"> {lower * 1000:g}"
                else:
                    share = (target - below) / (buckets[bound] - below) if buckets[bound] > below else 1.0
                    out[label] = round((lower + share * (bound - lower)) * 1000, 1)
                break
            lower, below = bound, buckets[bound]
    return out


def database_url(dbname: str) -> str:
    """The SQLAlchemy URL of one of the run's databases on the local PostgreSQL."""
    return with_database(PG_ADMIN_URL, dbname)


def create_bench_database() -> str:
    """A fresh, empty database for one part of the run; its name."""
    return create_database(PG_ADMIN_URL, "orders_bench")


def drop_bench_database(dbname: str) -> None:
    drop_databases(PG_ADMIN_URL, [dbname])


def migrate(url: str) -> None:
    """`orders-server migrate` on the database at `url`."""
    subprocess.run(
        [*server_command(), "migrate"],
        env=server_env({"ORDERS_DATABASE_URL": url}),
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def stock_every_sku(server: BenchServer) -> None:
    """Plenty of stock on every SKU, so that flow orders validate."""
    operations.load_stock(server.address, {operations.sku_name(n): 10**9 for n in range(SKUS)})


@contextlib.contextmanager
def postgres_server(workdir: Path, label: str, server_args: list[str]) -> Iterator[tuple[BenchServer, str]]:
    """A fresh database, migrated, stocked, with one server on it; all gone at the end. Yields the
    server and the database's name."""
    dbname = create_bench_database()
    try:
        url = database_url(dbname)
        migrate(url)
        server = BenchServer(url, workdir / f"server-postgresql-{label}.log", server_args)
        try:
            stock_every_sku(server)
            yield server, dbname
        finally:
            server.stop()
    finally:
        drop_bench_database(dbname)


def count_rows(dbname: str, table: str, where: str = "") -> int:
    """Rows of one of our tables, optionally filtered (`where` is our own SQL, never input)."""
    with closing(pg_connect(database_url(dbname))) as connection, connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table} {where}")  # noqa: S608 - our own table names
        row = cursor.fetchone()
        return int(row[0]) if row else 0


def pending_events(dbname: str) -> int:
    """Outbox events the saga has not handled yet."""
    return count_rows(dbname, "outbox_events", "WHERE status = 'PENDING'")


class BareStackServer:
    """`processes` processes of `python -m bench.bare_stack` on one port (SO_REUSEPORT when more
    than one, as `orders-server --workers N`), each waited for until its ready line; one log each."""

    def __init__(self, database_url: str, log_dir: Path, label: str, processes: int = 1) -> None:
        self.port = free_port() if processes > 1 else 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_paths: list[Path] = []
        try:
            # One at a time: the first creates the table; the others then find it.
            for n in range(processes):
                self._start(database_url, log_dir / f"bare-stack-{label}-{n}.log", processes > 1, n)
        except BaseException:
            self.stop()
            raise
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, database_url: str, log_path: Path, reuseport: bool, index: int) -> None:
        # Pinned as orders-server's process `index` is by --cpu-affinity auto (its default).
        command = [sys.executable, "-m", "bench.bare_stack", "--database-url", database_url]
        command += ["--port", str(self.port), "--cpu-index", str(index)]
        command += ["--reuseport"] if reuseport else []
        # The log is appended to: only what this start writes holds its ready line.
        before = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(command, env=server_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.log_paths.append(log_path)
        pattern = re.compile(re.escape(READY_LINE) + r" \S+:(\d+)")

        def ready() -> re.Match[str] | None:
            if proc.poll() is not None:
                raise AssertionError(f"bare stack exited with {proc.returncode}:\n{self.log()}")
            return pattern.search(log_since(log_path, before))

        self.port = int(wait_until(ready, timeout=30, what="the bare stack's ready line").group(1))

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.log_paths)

    def log_errors(self) -> list[str]:
        """The first lines of the logs that report an error."""
        return [line for line in self.log().splitlines() if "Error" in line or "Traceback" in line][:20]

    def stop(self, timeout: float = 30) -> list[int]:
        """SIGTERM to every process, SIGKILL to any still running after `timeout`; their exit codes."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [proc.returncode for proc in self.procs]


@contextlib.contextmanager
def bare_stack_server(workdir: Path, label: str, processes: int = 1) -> Iterator[tuple[BareStackServer, str]]:
    """A fresh database with the bare stack on it (`processes` processes); all gone at the end.
    Yields the server and the database's name."""
    dbname = create_bench_database()
    try:
        server = BareStackServer(database_url(dbname), workdir, label, processes)
        try:
            yield server, dbname
        finally:
            server.stop()
    finally:
        drop_bench_database(dbname)


def bare_stack_rows(dbname: str) -> int:
    """Rows the bare stack inserted."""
    return count_rows(dbname, TABLE)
