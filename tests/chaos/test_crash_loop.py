"""A crash loop: an order whose saga kills its process every time ends DEAD after its attempts.

One real `orders-server` process on PostgreSQL (`--max-attempts 3`, a one-second lease) runs under
a supervisor loop in the test that restarts it each time it dies, like systemd's `Restart=always`
(bounded in restarts and time). Its fault file holds `{"crash_on_sku": "BOOM"}`: the saga of any
order holding SKU BOOM kills the process (`os._exit(137)`) every time. A claim counts an attempt,
so the ORDER_CREATED event of the BOOM order is claimed three times (the hand-off at its commit,
then once by each restarted process after the lease of the dead one ran out), each killing the
process, and the fourth claim buries it DEAD unrun, with its cause kept. Exactly three crashes;
then the process stays up. The saga timeout (a few seconds here) then fails the BOOM order, whose
ORDER_EXPIRED releases nothing, so DESIGN.md's invariants hold on the whole database.

Normal orders placed before the BOOM order, during the crash loop (a client waiting for the server
to come back, retrying with the same `request_id` when a call dies with its process) and after it
all end VALIDATED. An event whose last attempt did not finish runs alone, so orders claimed beside
the BOOM order lose one attempt at most, to the first crash (the second test).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import grpc
import pytest
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import Engine, select

from db.engine import EngineSettings, make_engine
from db.tables import orders, outbox_events
from tests.chaos.harness import IN_TRANSIT, migrate, server_args
from tests.invariants import check_invariants, settled
from tests.local_services import free_port
from tests.support import READY, ServerProcess, Stubs, server_command, server_env, wait_until

MAX_ATTEMPTS = 3
LEASE_S = 1.0
SAGA_TIMEOUT_S = 6.0
MAX_STARTS = 2 * MAX_ATTEMPTS + 2  # the supervisor gives up past this: a loop that never ends
STOCK = {"BOOM": 10, "FINE-1": 1000, "FINE-2": 1000}
CRASH_LINE = "fault crash_on_sku: killing the process"
UNFINISHED = f"attempt {MAX_ATTEMPTS} did not finish: its lease ran out (the process died or stalled)"

pytestmark = [pytest.mark.chaos, pytest.mark.postgres, pytest.mark.timeout(90)]


class Supervisor:
    """Runs `orders-server ARGS` and starts it again each time it exits, `max_starts` times at most.

    A thread waits on the process; the exit codes of the incarnations that died are in `exits`,
    their logs (one file per incarnation) in `logs`. `stop()` ends the loop and the last process.
    """

    def __init__(self, args: list[str], workdir: Path, max_starts: int) -> None:
        self._args = args
        self._workdir = workdir
        self._max_starts = max_starts
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self.exits: list[int] = []
        self.logs: list[Path] = []
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> tuple[subprocess.Popen[bytes], IO[bytes]] | None:
        """The next incarnation, or None once stopping or past `max_starts`. Under the lock, so that
        `stop()` either sees the new process or prevents it."""
        with self._lock:
            if self._stopping.is_set():
                return None
            if len(self.logs) >= self._max_starts:
                self.failure = f"gave up after {len(self.logs)} starts, exits {self.exits}"
                return None
            log_path = self._workdir / f"server-{len(self.logs)}.log"
            log = open(log_path, "ab")  # noqa: SIM115 - closed when the process has exited
            self._process = subprocess.Popen(
                [*server_command(), *self._args],
                env=server_env(),
                cwd=self._workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            self.logs.append(log_path)
            return self._process, log

    def _run(self) -> None:
        while (spawned := self._spawn()) is not None:
            process, log = spawned
            try:
                code = process.wait()  # the supervisor's whole job: notice the death at once
            finally:
                log.close()
            if not self._stopping.is_set():
                with self._lock:
                    self.exits.append(code)

    def running(self) -> subprocess.Popen[bytes] | None:
        """The current process once it printed its ready line and while it runs; else None."""
        with self._lock:
            process, log_path = self._process, (self.logs[-1] if self.logs else None)
        if process is None or log_path is None or process.poll() is not None:
            return None
        return process if READY.search(log_path.read_text(errors="replace")) else None

    def crashes(self) -> int:
        with self._lock:
            return len(self.exits)

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        self._thread.join(20)

    def log_text(self) -> str:
        with self._lock:
            logs = list(self.logs)
        return "".join(f"--- {path.name}\n{path.read_text(errors='replace')}" for path in logs)


class Client:
    """PlaceOrder through one channel to the supervised port: a call waits for a process to listen,
    and a call that dies with its process is sent again with the same `request_id`."""

    def __init__(self, port: int) -> None:
        options = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 300),
        ]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.stubs = Stubs(self.channel)

    def place(self, request_id: str, items: list[tuple[str, int]], timeout: float = 20) -> str:
        request = pb.PlaceOrderRequest(
            customer_id="crash-loop",
            items=[pb.OrderItem(sku=sku, quantity=quantity) for sku, quantity in items],
            request_id=request_id,
        )

        def attempt() -> str | None:
            try:
                reply = self.stubs.orders.PlaceOrder(request, timeout=5, wait_for_ready=True)
            except grpc.RpcError as error:
                if error.code() in IN_TRANSIT:
                    return None  # the process died under the call: the same request_id again
                raise
            return str(reply.order.order_id)

        answered = f"PlaceOrder {request_id} answered"
        order_id = wait_until(attempt, timeout=timeout, interval=0.05, what=answered)
        assert order_id is not None
        return order_id


def statuses(engine: Engine, order_ids: list[str]) -> dict[str, str]:
    with engine.connect() as connection:
        rows = connection.execute(select(orders.c.id, orders.c.status).where(orders.c.id.in_(order_ids)))
        return {row.id: row.status for row in rows}


def created_event(engine: Engine, order_id: str) -> tuple[str, int, int, str | None]:
    """(status, attempts, claims, last_error) of the order's ORDER_CREATED event."""
    with engine.connect() as connection:
        row = connection.execute(
            select(
                outbox_events.c.status,
                outbox_events.c.attempts,
                outbox_events.c.claims,
                outbox_events.c.last_error,
            ).where(outbox_events.c.aggregate_id == order_id, outbox_events.c.event_type == "ORDER_CREATED")
        ).one()
    return row.status, row.attempts, row.claims, row.last_error


def test_an_order_that_kills_its_process_every_time_ends_dead_and_the_others_flow(
    make_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    started = time.monotonic()
    url = make_pg_database()
    migrate(url, tmp_path)
    fault_file = tmp_path / "faults.json"
    fault_file.write_text('{"crash_on_sku": "BOOM"}')
    port = free_port()  # every incarnation binds it: one client channel reaches whichever is up
    args = [
        *server_args(url, fault_file, lease_s=LEASE_S, port=port),
        "--max-attempts",
        str(MAX_ATTEMPTS),
        "--saga-timeout-s",
        str(SAGA_TIMEOUT_S),
        "--housekeeping-interval-s",
        "1",
    ]
    supervisor = Supervisor(args, tmp_path, MAX_STARTS)
    client = Client(port)
    engine = make_engine(url, EngineSettings(pool_size=2, max_overflow=0))
    fine: dict[str, list[str]] = {"before": [], "during": [], "after": []}
    during_stop = threading.Event()
    during_errors: list[BaseException] = []

    def place_during() -> None:
        """Normal orders one after another while the loop goes on, each sent until answered."""
        n = 0
        try:
            while not during_stop.is_set():
                n += 1
                fine["during"].append(client.place(f"during-{n}", [("FINE-2", 1)]))
                during_stop.wait(0.1)  # the client's pace
        except BaseException as error:
            during_errors.append(error)

    during = threading.Thread(target=place_during, name="client-during", daemon=True)
    try:
        supervisor.start()
        wait_until(supervisor.running, timeout=30, what="the first process to be ready")
        for sku, available in STOCK.items():
            client.stubs.set_stock(sku, available)
        for n in range(3):
            fine["before"].append(client.place(f"before-{n}", [("FINE-1", 2), ("FINE-2", 1)]))
        wait_until(
            lambda: set(statuses(engine, fine["before"]).values()) == {"VALIDATED"},
            what="the orders placed before to be VALIDATED",
        )

        boom = client.place("boom", [("FINE-1", 1), ("BOOM", 1)])
        during.start()

        def boom_dead() -> bool:
            assert supervisor.failure is None, supervisor.failure + "\n" + supervisor.log_text()[-5000:]
            return created_event(engine, boom)[0] == "DEAD"

        wait_until(
            boom_dead,
            timeout=30,
            interval=0.1,
            what="the BOOM order's event to be DEAD",
        )
        loop_s = time.monotonic() - started
        during_stop.set()
        during.join(30)
        assert not during.is_alive() and not during_errors, during_errors

        for n in range(3):
            fine["after"].append(client.place(f"after-{n}", [("FINE-1", 1), ("FINE-2", 2)]))
        everyone = [order_id for placed in fine.values() for order_id in placed]
        wait_until(
            lambda: set(statuses(engine, everyone).values()) == {"VALIDATED"},
            timeout=15,
            interval=0.1,
            what="every normal order to be VALIDATED",
        )
        # The saga timeout fails the BOOM order; its ORDER_EXPIRED event releases nothing.
        wait_until(
            lambda: statuses(engine, [boom]) == {boom: "FAILED"} and settled(engine),
            timeout=SAGA_TIMEOUT_S + 10,
            interval=0.1,
            what="the BOOM order to be FAILED by the saga timeout, and nothing PENDING",
        )
        survivor = supervisor.running()
        crashes = supervisor.crashes()
        event = created_event(engine, boom)
    finally:
        during_stop.set()
        supervisor.stop()
        client.channel.close()
        engine.dispose()

    logs = supervisor.log_text()
    crashed_logs = "".join(path.read_text(errors="replace") for path in supervisor.logs[:-1])
    # Orders of the loop answered by a process that crashed afterwards (timing decides how many).
    on_crashed = sum(f"order_id={order_id} rpc" in crashed_logs for order_id in fine["during"])
    print(
        f"\ncrash-loop: crashes={crashes} exits={supervisor.exits} starts={len(supervisor.logs)} "
        f"orders before={len(fine['before'])} during={len(fine['during'])} (on crashed processes "
        f"{on_crashed}) after={len(fine['after'])} "
        f"event={event} loop={loop_s:.1f}s time={time.monotonic() - started:.1f}s"
    )
    assert supervisor.failure is None, supervisor.failure + "\n" + logs[-5000:]
    assert survivor is not None, "the process did not stay up:\n" + logs[-5000:]
    assert crashes == MAX_ATTEMPTS and supervisor.exits == [137] * MAX_ATTEMPTS, logs[-5000:]
    assert len(supervisor.logs) == MAX_ATTEMPTS + 1, "restarted after the loop ended"
    for path in supervisor.logs[:MAX_ATTEMPTS]:
        assert CRASH_LINE in path.read_text(errors="replace"), f"{path.name} died of something else"
    assert CRASH_LINE not in supervisor.logs[-1].read_text(errors="replace")
    # Claimed once more than its attempts, then buried unrun, the cause of the last attempt kept.
    assert event == ("DEAD", MAX_ATTEMPTS + 1, MAX_ATTEMPTS + 1, UNFINISHED), event
    assert f"none of its {MAX_ATTEMPTS} attempts finished" in logs
    assert fine["during"], "no order was placed during the crash loop"
    summary = check_invariants(url, url, STOCK)
    assert summary.events_by_status["DEAD"] == 1, summary.events_by_status
    assert summary.stock["BOOM"] == (STOCK["BOOM"], 0), "the BOOM order reserved something"


def test_orders_claimed_beside_a_crash_looping_one_are_not_buried_with_it(
    make_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    """The BOOM order and four normal ones wait in the outbox before any saga runs, so the first
    round claims them together and the first crash kills the normal ones' steps too. From then on
    an event whose last attempt did not finish runs alone: the BOOM order alone uses its attempts
    (three crashes in all), and every normal order is VALIDATED."""
    url = make_pg_database()
    migrate(url, tmp_path)
    fault_file = tmp_path / "faults.json"
    fault_file.write_text('{"crash_on_sku": "BOOM"}')
    port = free_port()  # every incarnation binds it: one client channel reaches whichever is up
    flags = [*server_args(url, fault_file, lease_s=LEASE_S, port=port), "--max-attempts", str(MAX_ATTEMPTS)]
    placer = ServerProcess([*flags, "--saga-workers", "0"], server_env(), tmp_path, tmp_path / "placer.log")
    try:
        for sku, available in STOCK.items():
            placer.stubs.set_stock(sku, available)
        boom = placer.stubs.place("crash-loop", [("BOOM", 1)]).order_id
        normal = [placer.stubs.place("crash-loop", [("FINE-1", 1)]).order_id for _ in range(4)]
    finally:
        assert placer.stop() == 0
    supervisor = Supervisor(flags, tmp_path, MAX_STARTS)
    engine = make_engine(url, EngineSettings(pool_size=2, max_overflow=0))
    try:
        supervisor.start()
        wait_until(
            lambda: created_event(engine, boom)[0] == "DEAD"
            and set(statuses(engine, normal).values()) == {"VALIDATED"},
            timeout=40,
            interval=0.1,
            what="the BOOM order's event DEAD and every normal order VALIDATED",
        )
        wait_until(supervisor.running, timeout=15, what="the last process to be up")
        events = [created_event(engine, order_id) for order_id in normal]
    finally:
        supervisor.stop()
        engine.dispose()
    logs = supervisor.log_text()
    assert supervisor.exits == [137] * MAX_ATTEMPTS, logs[-5000:]
    assert {status for status, *_ in events} == {"DONE"}
    # At most the first crash took an attempt of theirs.
    assert max(attempts for _, attempts, _, _ in events) <= 2, events
    assert "runs alone" in logs
