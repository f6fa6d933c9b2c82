"""`orders-server --workers N`: N real server processes behind one port (SO_REUSEPORT), under a
supervisor that announces the pool, restarts a worker that dies and stops them all on SIGTERM
(docs/operations.md, "Several worker processes").
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from orders_service_api.v1 import orders_pb2 as pb

from server import supervisor
from tests.local_services import free_ports, signal_another_thread
from tests.support import ServerProcess, Stubs, run_cli, sample, scrape_metrics, wait_until

pytestmark = pytest.mark.e2e

FAST = ("--poll-interval-s", "0.2", "--health-interval-s", "0.2", "--grace-period-s", "2")
PLACE = "/orders.v1.OrderService/PlaceOrder"
HANDLED_PLACE = re.compile(
    r"\[worker-(\d+)/grpc_\d+\] orders\.rpc .* rpc /orders\.v1\.OrderService/PlaceOrder code=OK"
)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def fresh_stubs(address: str) -> Stubs:
    """A channel with a connection of its own: channels of one process otherwise share one
    connection per address, and the kernel spreads connections, not calls, over the workers."""
    return Stubs(grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]))


def placed_calls(metrics_port: int) -> float:
    return sample(scrape_metrics(metrics_port), "orders_rpc_total", method=PLACE, code="OK") or 0.0


def place_over_fresh_channels(
    address: str, channels: int, per_channel: int, wait_for_ready: bool = False
) -> list[str]:
    """Orders placed over `channels` new connections; `wait_for_ready` retries a connection the
    kernel reset (as the clients of a pool should, see docs/operations.md)."""
    request = pb.PlaceOrderRequest(customer_id="workers", items=[pb.OrderItem(sku="W-1", quantity=1)])
    order_ids = []
    for _ in range(channels):
        stubs = fresh_stubs(address)
        try:
            for _ in range(per_channel):
                reply = stubs.orders.PlaceOrder(request, timeout=10, wait_for_ready=wait_for_ready)
                order_ids.append(reply.order.order_id)
        finally:
            stubs.channel.close()
    return order_ids


def test_help_lists_workers(tmp_path: Path) -> None:
    done = run_cli("--help", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "--workers" in done.stdout
    assert "ORDERS_WORKERS" in done.stdout


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--workers", "0"], {}, "--workers"),
        ([], {"ORDERS_WORKERS": "-2"}, "--workers"),
        ([], {"ORDERS_WORKERS": "two"}, "ORDERS_WORKERS"),
        (["--workers", "2", "--metrics-port", "65535"], {}, "--metrics-port"),
        (["--saga-processes", "1"], {}, "needs PostgreSQL"),
        (["--saga-processes", "-1"], {}, "--saga-processes"),
        (["--saga-process-nice", "20"], {}, "--saga-process-nice"),
        (
            ["--saga-processes", "1", "--saga-workers", "0", "--database-url", "postgresql://u@h/db"],
            {},
            "--saga-workers",
        ),
    ],
    ids=[
        "zero",
        "negative-from-env",
        "not-a-number-from-env",
        "metrics-ports-past-65535",
        "saga-processes-on-sqlite",
        "negative-saga-processes",
        "nice-past-19",
        "saga-processes-without-saga-workers",
    ],
)
def test_a_bad_workers_setting_exits_2_with_one_line(
    args: list[str], env: dict[str, str], named: str, tmp_path: Path
) -> None:
    done = run_cli(*args, env=env, cwd=tmp_path, timeout=60)

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert named in done.stderr


@pytest.mark.postgres
def test_two_workers_share_the_port_settle_orders_and_stop_on_sigterm(
    make_pg_database: Callable[[], str], spawn_server: Callable[..., ServerProcess]
) -> None:
    url = make_pg_database()
    metrics = free_ports(2)  # the metrics ports of the two workers
    server = spawn_server(
        "--workers", "2", "--database-url", url, "--migrate-on-start", "always",
        "--metrics-port", str(metrics), *FAST,
    )  # fmt: skip
    assert re.search(
        r"orders-server ready on 127\.0\.0\.1:\d+ \(database: postgresql, plaintext, 2 workers\)",
        server.log(),
    )
    pids = server.worker_pids()
    assert sorted(pids) == [0, 1]
    server.stubs.set_stock("W-1", 1000)

    order_ids = place_over_fresh_channels(server.address, channels=16, per_channel=3)

    # Both workers took calls: each one's own metrics endpoint counted some, together all of them.
    per_worker = [placed_calls(metrics), placed_calls(metrics + 1)]
    assert all(count > 0 for count in per_worker), per_worker
    assert sum(per_worker) == len(order_ids)
    wait_until(
        lambda: all(server.stubs.get(o).status == pb.ORDER_STATUS_VALIDATED for o in order_ids),
        timeout=20,
        what="every order VALIDATED",
    )
    assert server.stubs.stock("W-1").available == 1000 - len(order_ids)
    # The log says the same: every line names its worker in the thread field.
    assert set(HANDLED_PLACE.findall(server.log())) == {"0", "1"}

    assert server.stop(signal.SIGTERM) == 0
    assert not [pid for pid in pids.values() if alive(pid)]
    assert server.log().rstrip().endswith("orders-server stopped")


def niceness(pid: int) -> set[int]:
    """The niceness of every thread of `pid` (Linux keeps it per thread)."""
    return {
        int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
        for task in Path(f"/proc/{pid}/task").iterdir()
    }


@pytest.mark.postgres
def test_saga_processes_run_every_saga_at_their_niceness_and_are_restarted_when_killed(
    make_pg_database: Callable[[], str], spawn_server: Callable[..., ServerProcess]
) -> None:
    """`--saga-processes 1`: the worker on the port takes the calls and runs no saga; the saga
    process takes no call, runs every saga, at nice 7 in all its threads, and comes back when
    killed (docs/operations.md, "The saga in processes of its own")."""
    url = make_pg_database()
    server = spawn_server(
        "--workers", "1", "--saga-processes", "1", "--saga-process-nice", "7",
        "--database-url", url, "--migrate-on-start", "always", *FAST,
    )  # fmt: skip
    assert re.search(
        r"orders-server ready on 127\.0\.0\.1:\d+ \(database: postgresql, plaintext, 1 workers, "
        r"1 saga process\)",
        server.log(),
    )
    assert re.search(r"orders-server saga worker 1 \(pid \d+\) ready on 127\.0\.0\.1:\d+", server.log())
    pids = server.worker_pids()
    assert niceness(pids[0]) == {0}
    assert niceness(pids[1]) == {7}
    server.stubs.set_stock("W-1", 1000)

    def place_and_settle(count: int) -> list[str]:
        order_ids = place_over_fresh_channels(server.address, count, 1, wait_for_ready=True)
        wait_until(
            lambda: all(server.stubs.get(o).status == pb.ORDER_STATUS_VALIDATED for o in order_ids),
            timeout=20,
            what="every order VALIDATED",
        )
        return order_ids

    first = place_and_settle(8)
    assert set(HANDLED_PLACE.findall(server.log())) == {"0"}  # only the worker on the port takes calls
    assert server.workers_running_sagas() == {1}  # only the saga process runs sagas

    os.kill(pids[1], signal.SIGKILL)
    restarted = wait_until(
        lambda: server.restarted(1, pids[1]), timeout=30, what="the saga process restarted and ready"
    )
    assert f"saga worker 1 (pid {restarted}) ready on" in server.log()
    assert niceness(restarted) == {7}
    second = place_and_settle(4)
    assert server.stubs.stock("W-1").available == 1000 - len(first) - len(second)
    assert server.workers_running_sagas() == {1}

    assert server.stop(signal.SIGTERM) == 0, server.log()[-4000:]
    assert not alive(restarted)


@pytest.mark.postgres
def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(
    make_pg_database: Callable[[], str], spawn_server: Callable[..., ServerProcess]
) -> None:
    url = make_pg_database()
    server = spawn_server("--workers", "2", "--database-url", url, "--migrate-on-start", "always", *FAST)
    server.stubs.set_stock("W-1", 1000)
    killed = server.worker_pids()[0]

    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: not alive(killed), what="the killed worker gone")

    # A connection caught by the dying listener is reset, so these calls wait for ready.
    assert len(place_over_fresh_channels(server.address, 4, 1, wait_for_ready=True)) == 4
    restarted = wait_until(
        lambda: server.restarted(0, killed), timeout=30, what="worker 0 restarted and ready"
    )
    assert f"worker 0 (pid {killed}) was killed by SIGKILL: restarting it" in server.log()
    assert not alive(killed) and alive(restarted)
    assert len(place_over_fresh_channels(server.address, 8, 1, wait_for_ready=True)) == 8
    assert server.stop(signal.SIGTERM) == 0, server.log()[-4000:]


def test_the_port_of_a_pool_is_not_shared_with_another_server(
    sqlite_url: str, spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    single = spawn_server("--database-url", sqlite_url, *FAST)

    # A pool never joins a port a single server holds...
    done = run_cli("--workers", "2", "--port", str(single.port), "--database-url", sqlite_url, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"could not bind 127.0.0.1:{single.port}" in done.stderr

    # ...and a single server never joins the port of a pool.
    pool = spawn_server("--workers", "2", "--database-url", f"sqlite:///{tmp_path / 'pool.db'}", *FAST)
    done = run_cli("--port", str(pool.port), "--database-url", sqlite_url, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    # (grpcio raises instead of returning port 0, so this exit is a traceback today, not BindError.)
    assert "bind" in done.stderr and f"127.0.0.1:{pool.port}" in done.stderr


@pytest.mark.postgres
def test_workers_shut_down_when_their_supervisor_is_killed(
    make_pg_database: Callable[[], str], spawn_server: Callable[..., ServerProcess]
) -> None:
    server = spawn_server(
        "--workers", "2", "--database-url", make_pg_database(), "--migrate-on-start", "always", *FAST
    )
    pids = server.worker_pids()

    server.stop(signal.SIGKILL)

    wait_until(lambda: not any(alive(pid) for pid in pids.values()), timeout=15, what="orphaned workers gone")
    assert server.log().count("the supervisor is gone: shutting down") == 2


def test_a_sigterm_delivered_to_another_thread_of_the_supervisor_stops_the_pool(
    spawn_server: Callable[..., ServerProcess], sqlite_url: str
) -> None:
    """A process-directed signal may reach any thread (the supervisor has its log writer's too)."""
    server = spawn_server("--workers", "2", "--database-url", sqlite_url, *FAST)

    signal_another_thread(server.proc.pid, signal.SIGTERM)

    assert server.proc.wait(timeout=15) == 0, server.log()  # TimeoutExpired: it went on
    assert "received SIGTERM: stopping 2 workers" in server.log()


IMPOSTOR = (
    'import sys\nsys.stderr.write("IMPOSTOR: the {name} package of the working directory\\n")\nsys.exit(97)\n'
)


@pytest.mark.parametrize("python_path", ["repo", "none"], ids=["pythonpath-set", "installed-package-only"])
def test_workers_run_the_installed_package_from_a_folder_that_has_its_own_server_package(
    python_path: str, spawn_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # A folder whose own `server` (and `domain`) packages end any process that imports them.
    folder = tmp_path / "elsewhere"
    for name in ("server", "domain"):
        (folder / name).mkdir(parents=True)
        for module in ("__init__.py", "main.py"):
            (folder / name / module).write_text(IMPOSTOR.format(name=name))
    env = {} if python_path == "repo" else {"PYTHONPATH": ""}

    server = spawn_server(
        "--workers", "2", "--database-url", f"sqlite:///{tmp_path / 'pool.db'}", *FAST, env=env, cwd=folder
    )

    assert sorted(server.worker_pids()) == [0, 1]
    server.stubs.set_stock("W-1", 100)
    order_ids = place_over_fresh_channels(server.address, channels=6, per_channel=1)
    wait_until(
        lambda: all(server.stubs.get(o).status == pb.ORDER_STATUS_VALIDATED for o in order_ids),
        timeout=20,
        what="every order VALIDATED",
    )
    assert "IMPOSTOR" not in server.log()
    assert server.stop(signal.SIGTERM) == 0, server.log()[-4000:]


def test_a_worker_imports_first_from_the_folder_its_supervisor_imported_from(tmp_path: Path) -> None:
    # This checkout is a source tree, not a site-packages folder: a worker of a supervisor run from
    # it (`python -m server.main --workers 2`, not installed) must find it without the working directory.
    root = str(Path(supervisor.__file__).resolve().parent.parent)

    assert supervisor.worker_import_path({}) == root
    given = {"PYTHONPATH": str(tmp_path)}
    assert supervisor.worker_import_path(given) == os.pathsep.join([root, str(tmp_path)])
