"""PostgreSQL LISTEN/NOTIFY: wake the dispatchers and order watchers of other processes.

- `Notifier` sends NOTIFY from its own autocommit connection, outside every order transaction:
  a transaction that notifies takes a cluster-wide lock at commit, so notifying inside the hot
  write would serialise every commit of the cluster. Requests are coalesced: at most one outbox
  notification per `min_interval_s`, and changed order ids batched into few payloads.
- `Listener` holds its own autocommit connection (LISTEN cannot share a pooled one), reconnects
  with backoff, re-LISTENs and fires its callbacks once after every (re)connect, since
  notifications sent while it was away are lost. Polling stays the guarantee of progress.
  It drops notifications its own process's `Notifier` sent (matched by backend pid): the local
  dispatcher and watchers were told in-process at commit, and the echo woke the dispatcher for a
  claim that found nothing and the watchers for a read that found nothing new, hundreds of times
  a second under load.
- Nobody is told what nobody hears. Listeners connect under the application name
  `orders-listener <id>`; before it sends, the notifier looks (at most once per `peer_check_s`, in
  pg_stat_activity) for a listener of another process on the database, and while there is none it
  sends nothing. A lone server paid for every NOTIFY anyway, in server and database CPU per
  order (docs/performance.md has the figures). A process that starts
  listening hears nothing from the others for up to `peer_check_s`; it drains the outbox once
  on connecting, and polling (`poll_interval_s`, the watchers' safety poll) covers the rest, as
  it does for any lost NOTIFY.
Neither works through PgBouncer in transaction mode; the poll interval then carries the load.
"""

from __future__ import annotations

import logging
import select
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
from sqlalchemy import Engine

log = logging.getLogger(__name__)

OUTBOX_CHANNEL = "orders_outbox"
ORDERS_CHANNEL = "orders_changed"
_MAX_PAYLOAD = 7000  # NOTIFY payloads must stay under 8000 bytes
LISTENER_APPLICATION = "orders-listener"  # prefix of every listener connection's application_name
# Whether a listener of another process is connected to this database.
_PEERS_QUERY = (
    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
    " AND application_name LIKE %s AND application_name <> %s)"
)


def _connect(engine: Engine, application_name: str | None = None) -> Any:
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    if application_name is not None:
        kwargs = {**kwargs, "application_name": application_name}
    connection = psycopg2.connect(*args, connect_timeout=5, **kwargs)
    connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    return connection


def listener_name() -> str:
    """A new application_name for one process's listener connection."""
    return f"{LISTENER_APPLICATION} {uuid.uuid4().hex[:16]}"


class Notifier:
    """Sends NOTIFY for the commits of this process (see the module docstring).

    `own_listener` is the application_name of this process's own `Listener`, which is no peer;
    `peer_check_s` is how long a finding about peers holds."""

    def __init__(
        self,
        engine: Engine,
        min_interval_s: float = 0.002,
        own_listener: str = "",
        peer_check_s: float = 1.0,
    ) -> None:
        self._engine = engine
        self._min_interval_s = min_interval_s
        self._own_listener = own_listener
        self._peer_check_s = peer_check_s
        self._peers_checked_at: float | None = None
        self._peers = False
        # Until then, no listener of another process was connected: commits need not even wake
        # this thread (a float, read without the lock).
        self._alone_until = 0.0
        self._condition = threading.Condition()
        self._outbox_pending = False
        self._orders: list[str] = []
        self._stopping = False
        self._backend_pid: int | None = None
        self.sent = 0  # NOTIFY statements sent
        self.unsent = 0  # batches dropped because no other process listened
        self._thread = threading.Thread(target=self._run, name="pg-notify", daemon=True)

    def sent_by_me(self, backend_pid: int) -> bool:
        """Whether a notification from this server backend came from this notifier's connection."""
        return backend_pid == self._backend_pid

    def start(self) -> None:
        self._thread.start()

    def outbox_committed(self) -> None:
        if self._alone_until > time.monotonic():
            return
        with self._condition:
            self._outbox_pending = True
            self._condition.notify()

    def order_changed(self, order_id: str) -> None:
        if self._alone_until > time.monotonic():
            return
        with self._condition:
            self._orders.append(order_id)
            self._condition.notify()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join(5)

    def _take(self) -> tuple[bool, list[str]] | None:
        with self._condition:
            while not (self._stopping or self._outbox_pending or self._orders):
                self._condition.wait()
            if self._stopping:
                return None
            outbox, orders = self._outbox_pending, self._orders
            self._outbox_pending, self._orders = False, []
            return outbox, orders

    def _run(self) -> None:
        connection: Any = None
        stop = threading.Event()
        while (work := self._take()) is not None:
            outbox, orders = work
            try:
                if connection is None or connection.closed:
                    self._backend_pid = None
                    connection = _connect(self._engine)
                    self._backend_pid = connection.info.backend_pid
                with connection.cursor() as cursor:
                    if not self._anyone_listening(cursor):
                        self.unsent += 1
                        continue  # nobody to tell
                    if outbox:
                        cursor.execute("SELECT pg_notify(%s, '')", (OUTBOX_CHANNEL,))
                        self.sent += 1
                    for payload in _batches(orders):
                        cursor.execute("SELECT pg_notify(%s, %s)", (ORDERS_CHANNEL, payload))
                        self.sent += 1
            except Exception as error:
                log.warning("NOTIFY failed (%s); other processes will poll", type(error).__name__)
                connection = None
                self._peers_checked_at = None
                stop.wait(0.5)
            stop.wait(self._min_interval_s)
        if connection is not None:
            connection.close()

    def _anyone_listening(self, cursor: Any) -> bool:
        """Whether a listener of another process is connected (found again once per peer_check_s).
        While none is, commits skip this thread altogether (`_alone_until`)."""
        now = time.monotonic()
        if self._peers_checked_at is None or now - self._peers_checked_at >= self._peer_check_s:
            cursor.execute(_PEERS_QUERY, (LISTENER_APPLICATION + "%", self._own_listener))
            self._peers = bool(cursor.fetchone()[0])
            self._peers_checked_at = now
            if not self._peers:
                self._alone_until = now + self._peer_check_s
        return self._peers


def _batches(order_ids: list[str]) -> list[str]:
    batches: list[str] = []
    current: list[str] = []
    size = 0
    for order_id in dict.fromkeys(order_ids):
        if size + len(order_id) + 1 > _MAX_PAYLOAD:
            batches.append(",".join(current))
            current, size = [], 0
        current.append(order_id)
        size += len(order_id) + 1
    if current:
        batches.append(",".join(current))
    return batches


class Listener:
    def __init__(
        self,
        engine: Engine,
        on_outbox: Callable[[], None],
        on_orders: Callable[[list[str]], None],
        reconnect_max_s: float = 5.0,
        sent_locally: Callable[[int], bool] = lambda _backend_pid: False,
        application_name: str = LISTENER_APPLICATION,
    ) -> None:
        self._engine = engine
        self.application_name = application_name
        self._sent_locally = sent_locally
        self._on_outbox = on_outbox
        self._on_orders = on_orders
        self._reconnect_max_s = reconnect_max_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        pause = 0.1
        while not self._stop.is_set():
            try:
                connection = _connect(self._engine, self.application_name)
            except Exception as error:
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", type(error).__name__, pause)
                self._stop.wait(pause)
                pause = min(pause * 2, self._reconnect_max_s)
                continue
            pause = 0.1
            try:
                with connection.cursor() as cursor:
                    cursor.execute(f"LISTEN {OUTBOX_CHANNEL}; LISTEN {ORDERS_CHANNEL}")
                self._on_outbox()  # drain whatever was announced while nobody listened
                while not self._stop.is_set():
                    readable, _, _ = select.select([connection], [], [], 0.1)
                    if not readable:
                        continue
                    connection.poll()
                    outbox = False
                    orders: list[str] = []
                    while connection.notifies:
                        note = connection.notifies.pop(0)
                        if self._sent_locally(note.pid):
                            continue
                        if note.channel == OUTBOX_CHANNEL:
                            outbox = True
                        elif note.payload:
                            orders.extend(note.payload.split(","))
                    if outbox:
                        self._on_outbox()
                    if orders:
                        self._on_orders(orders)
            except Exception as error:
                log.warning("LISTEN connection lost (%s); reconnecting", type(error).__name__)
            finally:
                connection.close()
