"""A bad setting ends a real `orders-server` process at once: exit status 2 and one line on stderr
that names the setting (README, "Configuration"), whether it came as a flag or an ORDERS_* variable,
for `serve` and for `migrate` alike, before anything touches a database.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from tests.support import run_cli

pytestmark = pytest.mark.e2e


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, cwd=cwd, timeout=60)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--database-url", "mysql://orders@db.internal/orders"], {}, "--database-url"),
        (["--inventory-database-url", "redis://cache.internal/0"], {}, "--inventory-database-url"),
        ([], {"ORDERS_DATABASE_URL": "oracle://orders@db.internal/orders"}, "--database-url"),
        (["--db-pool-size", "-1"], {}, "--db-pool-size"),
        ([], {"ORDERS_DB_POOL_SIZE": "-5"}, "pool-size"),
        ([], {"ORDERS_DB_POOL_SIZE": "many"}, "ORDERS_DB_POOL_SIZE"),
        (["--inventory-rate", "lots"], {}, "--inventory-rate"),
        (["--inventory-rate", "5/fortnight"], {}, "--inventory-rate"),
        ([], {"ORDERS_INVENTORY_RATE": "5 every second"}, "inventory-rate"),
        (["migrate", "--db-pool-size", "-1"], {}, "--db-pool-size"),
        (["migrate", "--database-url", "mysql://orders@db.internal/orders"], {}, "--database-url"),
    ],
    ids=[
        "unknown-backend",
        "unknown-inventory-backend",
        "unknown-backend-from-env",
        "negative-pool-size",
        "negative-pool-size-from-env",
        "pool-size-not-a-number-from-env",
        "malformed-rate",
        "rate-with-unknown-unit",
        "malformed-rate-from-env",
        "migrate-negative-pool-size",
        "migrate-unknown-backend",
    ],
)
def test_a_bad_setting_exits_2_with_one_line_naming_it(
    args: list[str], env: dict[str, str], named: str, tmp_path: Path
) -> None:
    done = run(args, env, tmp_path)

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("orders-server: error: "), lines[0]
    assert named in lines[0], lines[0]
    assert not list(tmp_path.iterdir()), "a rejected configuration must not create files (var/orders.db)"


def test_a_rate_of_zero_is_refused(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'orders.db'}"

    done = run(["migrate", "--database-url", database, "--inventory-rate", "0/second"], {}, tmp_path)

    assert done.returncode == 2, done.stderr
    assert "--inventory-rate" in done.stderr


def test_a_malformed_database_url_is_reported_without_its_password(tmp_path: Path) -> None:
    password = secrets.token_hex(8)

    done = run(
        ["--database-url", f"postgresql://orders:{password}@db.internal:notaport/orders"], {}, tmp_path
    )

    assert done.returncode == 2, done.stderr
    assert "--database-url" in done.stderr
    assert password not in done.stderr, done.stderr


def test_a_tokens_file_with_an_unknown_scope_is_refused_without_showing_its_tokens(tmp_path: Path) -> None:
    secret = secrets.token_hex(8)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{secret} orders:read,orders:delete\n")

    done = run(["--auth-tokens-file", str(tokens)], {}, tmp_path)

    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "--auth-tokens-file" in done.stderr and "line 1: an unknown scope" in done.stderr
    assert secret not in done.stderr
