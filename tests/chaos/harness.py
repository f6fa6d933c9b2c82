"""What the chaos tests share: a cluster of `orders-server` processes on one PostgreSQL database, a
client ledger of what the service acknowledged, and the checks of DESIGN.md's "Never lose an order".

- `Cluster` keeps N slots, each one real `orders-server` process at a time (a new port, log file and
  process per incarnation; one fault file per slot). It can SIGKILL a slot, arm a fault switch
  (`crash_after_reserve`, `crash_before_complete`) in the slot's fault file so that the process kills
  itself (`os._exit(137)`) at that exact point of its next saga step, stall a slot past its leases
  (SIGSTOP, SIGCONT), and restart a slot.
- `Ledger` is the clients' side: every PlaceOrder carries a `request_id`; a call that fails in
  transit (UNAVAILABLE, a closed channel...) is retried once on another instance with the same
  `request_id`, so a retry of an order that was committed after all creates nothing new. Only what
  was answered OK counts as acknowledged.
- `check_acknowledged` asserts that every acknowledged order exists under its `request_id`, is settled,
  and that every acknowledged cancel left the order CANCELLED.
- `count_lines` counts log lines that show what happened inside the processes: steps stalled by the
  fault switch (`STALLED`), completions refused by the lease fence (`FENCED`), saga steps that found
  their event taken over and wrote nothing (`SUPERSEDED`).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import Engine, select

from db.engine import EngineSettings, make_engine
from db.tables import orders
from tests.invariants import Summary, check_invariants, settled
from tests.support import (
    ServerProcess,
    Stubs,
    migrate_database,
    server_env,
    wait_until,
)

LEASE_S = 2.0
SKUS = tuple(f"CHAOS-{i:02d}" for i in range(20))
# A call that may have failed anywhere between the client and the commit: retried with the same
# request_id on another instance. ValueError: the channel of a killed instance was closed under us.
IN_TRANSIT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
FENCED = re.compile(r"lease lost to another dispatcher")
SUPERSEDED = re.compile(r"passed to another step; this one wrote nothing")
STALLED = re.compile(r"fault stall: [\d.]+s at (?P<boundary>\w+)")
SETTLED = frozenset({"VALIDATED", "FAILED", "CANCELLED"})


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def migrate(url: str, cwd: Path) -> None:
    """`orders-server migrate`, as an operator runs it before starting PostgreSQL instances."""
    migrate_database(url, cwd)


def server_args(
    url: str, fault_file: Path | None = None, *, lease_s: float = LEASE_S, port: int = 0
) -> list[str]:
    """Flags of every chaos instance: short leases and polls, quick retries, modest pools (2 cores,
    one PostgreSQL of 100 connections). CHAOS_SAGA_WORKERS overrides the 4 saga workers."""
    args = [
        "--port",
        str(port),
        "--database-url",
        url,
        "--lease-s",
        str(lease_s),
        "--poll-interval-s",
        "0.2",
        "--retry-base-s",
        "0.1",
        "--retry-max-s",
        "2",
        "--saga-workers",
        os.environ.get("CHAOS_SAGA_WORKERS", "4"),
        "--max-workers",
        "8",
        "--grace-period-s",
        "2",
        "--health-interval-s",
        "1",
    ]
    if fault_file is not None:
        args += ["--fault-file", str(fault_file)]
    return args


def basket(rng: random.Random) -> list[tuple[str, int]]:
    """1-3 distinct SKUs, 1-3 of each."""
    return [(sku, rng.randint(1, 3)) for sku in sorted(rng.sample(SKUS, rng.randint(1, 3)))]


def count_lines(logs: Sequence[Path], pattern: re.Pattern[str]) -> int:
    """Matches of `pattern` over all logs (those that exist)."""
    return sum(len(pattern.findall(path.read_text(errors="replace"))) for path in logs if path.exists())


def fenced_completions(logs: Sequence[Path]) -> int:
    """Completions refused by the lease fence ("lease lost to another dispatcher"), over all logs."""
    return count_lines(logs, FENCED)


@dataclass
class Ledger:
    """What the clients sent and what the service acknowledged (OK), shared by client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requested: set[str] = field(default_factory=set)  # request ids sent at least once
    acknowledged: dict[str, str] = field(default_factory=dict)  # request id -> order id
    cancel_requested: int = 0
    cancelled: set[str] = field(default_factory=set)  # order ids whose CancelOrder answered OK
    place_codes: Counter[str] = field(default_factory=Counter)  # every PlaceOrder attempt's outcome
    cancel_codes: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    retried_ok: int = 0

    def place(
        self,
        targets: Sequence[Stubs],
        request_id: str,
        customer: str,
        items: Sequence[tuple[str, int]],
    ) -> str | None:
        """PlaceOrder on targets[0]; if it fails in transit, once more on targets[1] with the same
        request_id. Returns the acknowledged order id, or None."""
        with self.lock:
            self.requested.add(request_id)
        for attempt, stubs in enumerate(targets[:2]):
            try:
                order = stubs.place(customer, items, request_id=request_id)
            except grpc.RpcError as error:
                code = error.code()
                self._count(self.place_codes, code.name)
                if code not in IN_TRANSIT:
                    return None
            except ValueError:  # "Cannot invoke RPC on closed channel!": the instance was killed
                self._count(self.place_codes, "CLOSED_CHANNEL")
            else:
                with self.lock:
                    self.place_codes["OK"] += 1
                    self.acknowledged[request_id] = order.order_id
                    self.retried_ok += attempt
                return str(order.order_id)
            if attempt == 0 and len(targets) > 1:
                with self.lock:
                    self.retries += 1
        return None

    def cancel(self, stubs: Stubs, order_id: str) -> None:
        """One CancelOrder, never retried: only an OK answer says the order must end CANCELLED."""
        with self.lock:
            self.cancel_requested += 1
        try:
            stubs.orders.CancelOrder(pb.CancelOrderRequest(order_id=order_id), timeout=10)
        except grpc.RpcError as error:
            self._count(self.cancel_codes, error.code().name)
        except ValueError:
            self._count(self.cancel_codes, "CLOSED_CHANNEL")
        else:
            with self.lock:
                self.cancel_codes["OK"] += 1
                self.cancelled.add(order_id)

    def _count(self, counter: Counter[str], key: str) -> None:
        with self.lock:
            counter[key] += 1


def check_acknowledged(engine: Engine, ledger: Ledger) -> Counter[str]:
    """Every acknowledged order is stored under its request_id and settled; every acknowledged cancel
    stuck; no request_id made more than one order (the unique key) and no order came from nowhere."""
    with engine.connect() as connection:
        rows = connection.execute(select(orders.c.id, orders.c.request_id, orders.c.status)).all()
    by_request = {row.request_id: row for row in rows}
    problems: list[str] = []
    for request_id, order_id in ledger.acknowledged.items():
        row = by_request.get(request_id)
        if row is None:
            problems.append(f"acknowledged order {order_id} (request {request_id}) is not in the database")
        elif row.id != order_id:
            problems.append(f"request {request_id} was acknowledged as {order_id} but stored as {row.id}")
        elif row.status not in SETTLED:
            problems.append(f"acknowledged order {order_id} is {row.status}, not settled")
    status = {row.id: row.status for row in rows}
    for order_id in ledger.cancelled:
        if status.get(order_id) != "CANCELLED":
            problems.append(f"order {order_id} was cancelled (OK) but is {status.get(order_id)}")
    strangers = {row.request_id for row in rows} - ledger.requested
    if strangers:
        problems.append(f"{len(strangers)} orders with request ids no client sent: {sorted(strangers)[:3]}")
    assert not problems, f"{len(problems)} problem(s):\n  " + "\n  ".join(problems[:50])
    return Counter(row.status for row in rows)


class Cluster:
    """`size` slots on one database; each slot runs one `orders-server` process at a time."""

    def __init__(self, url: str, workdir: Path, size: int = 3) -> None:
        self.url = url
        self.workdir = workdir
        self.lock = threading.Lock()
        self.instances: list[ServerProcess | None] = [None] * size
        self.fault_files = [workdir / f"faults-{slot}.json" for slot in range(size)]
        self.logs: list[Path] = []
        self.crash_codes: Counter[int] = Counter()
        for path in self.fault_files:
            path.write_text("{}")

    def start(self, slot: int, extra: Sequence[str] = ()) -> ServerProcess:
        """A new process in `slot` (new port, new log file), once it printed its ready line."""
        with self.lock:
            assert self.instances[slot] is None, f"slot {slot} is running"
            log_path = self.workdir / f"slot{slot}-{len(self.logs)}.log"
            self.logs.append(log_path)
        self.write_fault(slot, {})
        process = ServerProcess(
            [*server_args(self.url, self.fault_files[slot]), *extra], server_env(), self.workdir, log_path
        )
        with self.lock:
            self.instances[slot] = process
        return process

    def start_all(self) -> None:
        """Start every slot at once (each start waits for its ready line)."""
        with ThreadPoolExecutor(len(self.instances)) as pool:
            list(pool.map(self.start, range(len(self.instances))))

    def live(self) -> list[ServerProcess]:
        with self.lock:
            return [p for p in self.instances if p is not None]

    def targets(self, index: int) -> list[Stubs]:
        """Stubs of two different live instances, round-robin by `index` (for a call and its retry)."""
        live = self.live()
        if not live:
            return []
        first = index % len(live)
        return [live[(first + k) % len(live)].stubs for k in range(min(2, len(live)))]

    def running(self) -> list[int]:
        with self.lock:
            return [slot for slot, p in enumerate(self.instances) if p is not None]

    def kill(self, slot: int) -> int:
        """SIGKILL the slot's process: no cleanup, leases left to expire. Returns the exit status."""
        process = self._take(slot)
        process.proc.send_signal(signal.SIGKILL)
        process.proc.wait(30)
        return process.stop()  # already dead: closes the channel and the log file

    def stall(self, slot: int, seconds: float) -> None:
        """SIGSTOP the slot's process for `seconds` (a long GC pause, a frozen VM), then SIGCONT: its
        leases run out meanwhile, other instances take its events over, and its steps resume stale."""
        with self.lock:
            process = self.instances[slot]
        assert process is not None, f"slot {slot} is not running"
        process.proc.send_signal(signal.SIGSTOP)
        try:
            threading.Event().wait(seconds)  # the stall itself: nothing to wait for
        finally:
            process.proc.send_signal(signal.SIGCONT)

    def crash_at(self, slot: int, fault: str, timeout: float = 30.0) -> int:
        """Arm `fault` in the slot's fault file: the process kills itself at that point of its next
        saga step (it re-reads the file when it changes). Waits for the death; returns the exit code."""
        with self.lock:
            process = self.instances[slot]
        assert process is not None, f"slot {slot} is not running"
        self.write_fault(slot, {fault: True})
        wait_until(
            lambda: process.proc.poll() is not None,
            timeout=timeout,
            interval=0.05,
            what=f"slot {slot} to crash at {fault}",
        )
        self._take(slot)
        code = process.stop()
        self.write_fault(slot, {})
        self.crash_codes[code] += 1
        assert code == 137, f"slot {slot} exited {code}, not 137:\n{process.log()[-3000:]}"
        assert f"fault {fault}: killing the process" in process.log(), process.log()[-3000:]
        return code

    def write_fault(self, slot: int, switches: dict[str, object]) -> None:
        """Replace the slot's fault file atomically (a reader never sees half a file)."""
        path = self.fault_files[slot]
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(switches))
        os.replace(scratch, path)

    def _take(self, slot: int) -> ServerProcess:
        with self.lock:
            process = self.instances[slot]
            self.instances[slot] = None
        assert process is not None, f"slot {slot} is not running"
        return process

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        for slot in range(len(self.instances)):
            with self.lock:
                process = self.instances[slot]
                self.instances[slot] = None
            if process is not None:
                process.stop(sig, timeout=15)


class ClientLoad:
    """Client threads, each running `run(index)` against the cluster until the `with` block ends
    (`stop` is set then); a thread that does not finish within 30 s fails the test."""

    def __init__(self, cluster: Cluster, ledger: Ledger, threads: int) -> None:
        self.cluster = cluster
        self.ledger = ledger
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self.run, args=(i,), name=f"client-{i}", daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"

    def run(self, index: int) -> None:
        raise NotImplementedError


def wait_settled(cluster: Cluster, engine: Engine, timeout: float) -> None:
    """Until no order and no event is PENDING; every live instance must still be running."""
    wait_until(lambda: settled(engine), timeout=timeout, interval=0.25, what="every order settled")
    for process in cluster.live():
        assert process.proc.poll() is None, process.log()[-3000:]


def verify(url: str, stock: dict[str, int], ledger: Ledger) -> tuple[Summary, Counter[str]]:
    """DESIGN.md's invariants on the rows, then every acknowledged order and cancel honoured."""
    summary = check_invariants(url, url, stock)
    engine = make_engine(url, EngineSettings(pool_size=2, max_overflow=0))
    try:
        return summary, check_acknowledged(engine, ledger)
    finally:
        engine.dispose()
