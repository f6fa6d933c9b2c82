"""`orders-server --workers N`: N worker processes on one gRPC port, and the supervisor above them;
with `--saga-processes M`, M more that run the sagas and take no calls.

Each worker is a whole `orders-server serve` (gRPC server, outbox dispatcher, health, metrics),
started as a fresh interpreter because grpcio does not survive fork(). Their listening sockets
share the port through SO_REUSEPORT and the kernel spreads new connections over them; a gRPC
channel keeps its connection, so the load spreads per connection, not per call.

The supervisor binds a SO_REUSEPORT socket on the port and never listens on it (so it receives no
connection): `--port 0` becomes one port for every worker, and no other program can take the port
while a worker restarts. Each worker gets one end of a socket pair (`ORDERS_WORKER_LINK`): it
writes a line once it serves, its end closing tells the supervisor at once that it died, and the
supervisor's end closing (the supervisor was killed) tells the worker to shut down rather than
serve on as an orphan.

With `--saga-processes M` the supervisor starts M more workers (indexes N to N+M-1) that run the
sagas and take no calls: each serves gRPC on a loopback port of its own (health, for nobody in
particular) and runs at `--saga-process-nice`, and the N workers on the shared port run no saga
(`Settings.sagas_here`). In one process the saga's work shares the GIL with the calls and makes their
tail (docs/performance.md); in processes of their own, the calls' processes hand their events over
through the database's NOTIFY and a claim instead of in memory, and the saga processes run them in
batches. The restart and stop rules are the same for every worker.

Why one module of this size: the supervisor and the worker side of one protocol (start, ready,
stop, restart) between processes.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import site
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from sqlalchemy.engine import make_url

from server import bootstrap
from server.config import Settings, environment

log = logging.getLogger("orders.supervisor")

LINK_ENV = "ORDERS_WORKER_LINK"
# A worker that dies is started again after this delay; more restarts than the cap within a
# minute mean a crash loop, which the supervisor reports by stopping everything and exiting 1.
RESTART_DELAY_S = 1.0
MAX_RESTARTS_PER_MINUTE = 5
# Beyond grace period and shutdown delay, how long a stopping worker may take before SIGKILL.
STOP_MARGIN_S = 10.0
# `-P`: nothing in front of the worker's import path for the working directory, where `python -m`
# puts it: a `server/` folder in whatever directory the operator started from would otherwise stand
# in for this package in every worker.
WORKER_COMMAND = (sys.executable, "-P", "-m", "server.main", "serve")
# The folder that holds the `server` package this supervisor runs.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


SAGAS_ONLY = "sagas"  # the link's third field for a worker of --saga-processes


class WorkerLink:
    """A worker's end of the link to its supervisor."""

    def __init__(self, index: int, link: socket.socket, sagas_only: bool = False) -> None:
        self.index = index
        self.sagas_only = sagas_only
        self._link = link

    @property
    def role(self) -> str:
        """How the worker names itself in its ready line."""
        return "saga worker" if self.sagas_only else "worker"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerLink | None:
        """The link the supervisor handed down, or None in a process it did not start."""
        value = env.get(LINK_ENV)
        if not value:
            return None
        index, fd, *role = value.split(":")
        return cls(int(index), socket.socket(fileno=int(fd)), role == [SAGAS_ONLY])

    def tag_logs(self) -> None:
        """Every log line names this worker in its thread field (`worker-1/grpc_3`), so that the
        interleaved output of N workers can be told apart without changing the log format."""
        for handler in logging.getLogger().handlers:
            handler.addFilter(_WorkerTag(self.index))

    def ready(self) -> None:
        self._link.sendall(b"ready\n")

    def on_orphaned(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from a daemon thread) once the supervisor is gone."""

        def watch() -> None:
            try:
                while self._link.recv(64):
                    pass
            except OSError:
                pass
            log.warning("the supervisor is gone: shutting down")
            callback()

        threading.Thread(target=watch, name="supervisor-link", daemon=True).start()


class _WorkerTag(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self._prefix = f"worker-{index}/"

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.threadName).startswith(self._prefix):
            record.threadName = self._prefix + str(record.threadName)
        return True


def worker_import_path(env: Mapping[str, str]) -> str:
    """A worker's PYTHONPATH: the folder this supervisor's packages came from first, so that the
    worker runs the same code whether the package is installed (editable or not) or run from a
    source tree, whatever the working directory. A site-packages folder is left where the
    interpreter puts it, behind the standard library."""
    installed = [*site.getsitepackages(), site.getusersitepackages()]
    site_folders = {Path(folder).resolve() for folder in installed}
    given = env.get("PYTHONPATH", "")
    if _SOURCE_ROOT in site_folders:
        return given
    return os.pathsep.join(filter(None, [str(_SOURCE_ROOT), given]))


def run(settings: Settings) -> int:
    """Serve with `settings.workers` processes until SIGTERM or SIGINT; 0 when all stopped cleanly."""
    try:
        reservation = reserve_port(settings.host, settings.port)
    except OSError as error:
        log.error("could not bind %s:%d: %s", settings.host, settings.port, error)
        return 1
    with reservation:
        migrate_once(settings)
        return _Pool(settings, int(reservation.getsockname()[1])).run()


def reserve_port(host: str, port: int) -> socket.socket:
    """A SO_REUSEPORT socket bound to the port, for the supervisor's lifetime. A bind without
    SO_REUSEPORT comes first: it fails when another program already listens there, which the
    workers' own binds (with SO_REUSEPORT) would not notice."""
    family, kind, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        port = probe.getsockname()[1]
    reservation = socket.socket(family, kind)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((address[0], port, *address[2:]))
    except OSError:
        reservation.close()
        raise
    return reservation


def migrate_once(settings: Settings) -> None:
    """Migrations once, before any worker starts, by the rule a single process applies
    (`bootstrap.migrate_if_configured`); the workers then start with `never`."""
    if settings.migrate_on_start == "never":
        return
    engines = bootstrap.make_engines(settings)
    try:
        if bootstrap.migrate_if_configured(settings, engines):
            log.info("migrations applied")
    finally:
        engines.dispose()


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    link: socket.socket
    ready: bool = False


class _Pool:
    """The supervisor's event loop: worker links and a wake-up socket for signals, on one selector."""

    def __init__(self, settings: Settings, port: int) -> None:
        self._settings = settings
        self._port = port
        self._selector = selectors.DefaultSelector()
        self._workers: dict[int, _Worker] = {}
        self._due: dict[int, float] = {}  # workers to start again: index -> monotonic time
        self._restarts: deque[float] = deque()
        self._announced = False
        self._stop_signal: signal.Signals | None = None
        self._failed = False
        self._wake, self._waker = socket.socketpair()
        self._waker.setblocking(False)
        self._selector.register(self._wake, selectors.EVENT_READ)

    @property
    def _count(self) -> int:
        """Workers in all: the --workers ones (0 to N-1), then the --saga-processes ones."""
        return self._settings.workers + self._settings.saga_processes

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # A signal the kernel delivers to another thread (the log writer's) only trips the flag the
        # main thread checks when it runs; the byte the interpreter then writes here wakes the
        # select below, so the handler runs (the main thread of a worker wakes once a second).
        signal.set_wakeup_fd(self._waker.fileno(), warn_on_full_buffer=False)
        for index in range(self._count):
            self._start(index)
        while self._stop_signal is None and not self._failed:
            self._poll(self._until_next_restart())
            self._start_due()
            self._announce_when_ready()
        return self._stop_all()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_signal = signal.Signals(signum)
        log.info("received %s: stopping %d workers", self._stop_signal.name, len(self._workers))
        self._waker.send(b"\0")

    def _worker_settings(self, index: int) -> Settings:
        """A --workers worker serves the shared port (and runs no saga when there are saga
        processes: `Settings.sagas_here`); a --saga-processes worker serves a loopback port of its
        own, which no client is told of, and runs the sagas."""
        settings = replace(
            self._settings,
            port=self._port,
            migrate_on_start="never",
            metrics_port=self._settings.metrics_port + index if self._settings.metrics_port else 0,
        )
        if not self._runs_sagas_only(index):
            return settings  # with saga processes, its `sagas_here` is 0
        return replace(settings, host="127.0.0.1", port=0, workers=1, saga_processes=0)

    def _runs_sagas_only(self, index: int) -> bool:
        """Worker `index` is one of --saga-processes (they come after the --workers ones)."""
        return index >= self._settings.workers

    def _start(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        settings = self._worker_settings(index)
        link = f"{index}:{theirs.fileno()}"
        if self._runs_sagas_only(index):
            link += f":{SAGAS_ONLY}"
        env = {**os.environ, **environment(settings), LINK_ENV: link}
        env["PYTHONPATH"] = worker_import_path(env)
        try:
            # Its own process group: a Ctrl-C in the terminal reaches the supervisor only, which
            # forwards it, instead of every worker at once.
            process = subprocess.Popen(
                list(WORKER_COMMAND),
                env=env,
                pass_fds=(theirs.fileno(),),
                process_group=0,
            )
        finally:
            theirs.close()
        worker = _Worker(index, process, ours)
        self._workers[index] = worker
        self._selector.register(ours, selectors.EVENT_READ, worker)
        log.info("worker %d started (pid %d)", index, process.pid)

    def _poll(self, timeout: float | None) -> None:
        """Wait for a worker's news (ready, or gone) or a signal, and act on it."""
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._wake.recv(64)
                continue
            worker: _Worker = key.data
            try:
                news = worker.link.recv(64)
            except OSError:
                news = b""
            if news:
                worker.ready = True
            else:
                self._on_exit(worker, self._reap(worker))

    def _reap(self, worker: _Worker) -> int:
        self._selector.unregister(worker.link)
        worker.link.close()
        del self._workers[worker.index]
        try:
            return worker.process.wait(STOP_MARGIN_S)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            return worker.process.wait()

    def _on_exit(self, worker: _Worker, status: int) -> None:
        described = _status(status)
        if self._stop_signal is not None or self._failed:
            log.info("worker %d (pid %d) %s", worker.index, worker.process.pid, described)
            # A worker still starting when the signal came may die of it before its handler is set.
            self._failed = self._failed or status not in (0, -int(self._stop_signal or 0))
        elif not self._announced:
            log.error(
                "worker %d (pid %d) %s before every worker was ready",
                worker.index,
                worker.process.pid,
                described,
            )
            self._failed = True
        elif self._may_restart():
            log.warning(
                "worker %d (pid %d) %s: restarting it in %.1f s",
                worker.index,
                worker.process.pid,
                described,
                RESTART_DELAY_S,
            )
            self._due[worker.index] = time.monotonic() + RESTART_DELAY_S
        else:
            log.error(
                "worker %d (pid %d) %s: more than %d restarts in a minute, giving up",
                worker.index,
                worker.process.pid,
                described,
                MAX_RESTARTS_PER_MINUTE,
            )
            self._failed = True

    def _may_restart(self) -> bool:
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > 60:
            self._restarts.popleft()
        if len(self._restarts) >= MAX_RESTARTS_PER_MINUTE:
            return False
        self._restarts.append(now)
        return True

    def _until_next_restart(self) -> float | None:
        if not self._due:
            return None
        return max(0.0, min(self._due.values()) - time.monotonic())

    def _start_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self._due.items()):
            if when <= now and self._stop_signal is None and not self._failed:
                del self._due[index]
                self._start(index)

    def _announce_when_ready(self) -> None:
        """The ready line, once, when every worker first serves: what scripts and tests wait for."""
        if self._announced or len(self._workers) < self._count:
            return
        if all(worker.ready for worker in self._workers.values()):
            self._announced = True
            sagas = self._settings.saga_processes
            log.info(
                "orders-server ready on %s:%d (database: %s, %s, %d workers%s)",
                self._settings.host,
                self._port,
                make_url(self._settings.database_url).get_backend_name(),
                self._settings.security,
                self._settings.workers,
                f", {sagas} saga process{'es' if sagas > 1 else ''}" if sagas else "",
            )

    def _stop_all(self) -> int:
        """Forward the stop signal (SIGTERM after a failure), wait for every worker's own graceful
        shutdown, SIGKILL the ones that overrun it; 0 only when all exited 0."""
        self._due.clear()
        forwarded = self._stop_signal or signal.SIGTERM
        for worker in self._workers.values():
            worker.process.send_signal(forwarded)
        settings = self._settings
        deadline = time.monotonic() + settings.grace_period_s + settings.shutdown_delay_s + STOP_MARGIN_S
        while self._workers and time.monotonic() < deadline:
            self._poll(deadline - time.monotonic())
        for worker in list(self._workers.values()):
            log.error("worker %d (pid %d) did not stop in time: killing it", worker.index, worker.process.pid)
            worker.process.kill()
            self._reap(worker)
            self._failed = True
        log.info("orders-server stopped")
        return 1 if self._failed else 0


def _status(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"
