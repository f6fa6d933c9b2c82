"""SQLite: baseline and place on one server over a database file."""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from bench import operations
from bench.plan import SKUS
from bench.runner import Runner
from bench.scenarios.postgres import watch_backlog
from bench.server import BenchServer, stock_every_sku


def run_sqlite(runner: Runner, workdir: Path, server_args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="orders-bench-") as tmp:
        url = f"sqlite:///{tmp}/orders.db"
        server = BenchServer(url, workdir / "server-sqlite.log", server_args)
        try:
            stock_every_sku(server)
            out["baseline"] = runner.scenario("sqlite baseline", server.address, operations.health_op, {})
            out["place"] = runner.scenario(
                "sqlite place", server.address, operations.place_op, {"skus": SKUS}
            )
            out["saga_backlog"] = watch_backlog(lambda: _pending(Path(tmp) / "orders.db"), runner.duration)
            out["memory_kb"] = server.memory_kb()
        finally:
            out["server_exit"] = server.stop()
    return out


def _pending(path: Path) -> int:
    """Outbox events the saga has not handled yet, read from the server's database file."""
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as connection:
        query = "SELECT count(*) FROM outbox_events WHERE status = 'PENDING'"
        (count,) = connection.execute(query).fetchone()
    return int(count)
