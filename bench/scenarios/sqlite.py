"""SQLite: baseline and place on one server over a database file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench import operations
from bench.plan import SKUS
from bench.runner import Runner
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
            out["memory_kb"] = server.memory_kb()
        finally:
            out["server_exit"] = server.stop()
    return out
