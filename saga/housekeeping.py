"""Housekeeping: delete DONE outbox rows after their retention, in bounded batches, report the
backlog, and sweep sagas older than their timeout. One thread per process; every instance may run
it (deletes are idempotent, the sweep is version-checked).

The sweep fails a PENDING order older than `saga_timeout_s` ("saga timed out") and writes an
ORDER_EXPIRED event in the same transaction, whose handler releases whatever was reserved. A saga
still running for that order loses its version check and releases too, so either way the order
ends FAILED with nothing reserved.

On a PostgreSQL database with autovacuum off, it also keeps the planner's statistics of the
orders tables, as autovacuum would (db.statistics): the outbox claim needs them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from db import statistics
from db.queue import LeasedQueue, QueueUnitOfWork
from db.unit_of_work import OrdersUnitOfWork
from domain.model import utcnow

log = logging.getLogger("orders.housekeeping")

BacklogObserver = Callable[[int, float], None]  # (pending events, oldest pending age in seconds)


def purge_done(
    uow: Callable[..., QueueUnitOfWork[LeasedQueue]], older_than: datetime, batch: int, stop: threading.Event
) -> int:
    """Delete a queue's DONE rows last touched before `older_than`, at most `batch` per transaction,
    until a batch comes back short or `stop` is set: the rows deleted (the outbox's here, the event
    relay's in relay.service)."""
    total = 0
    while not stop.is_set():
        with uow() as unit:
            deleted = unit.outbox.purge_done(older_than, batch)
            unit.commit()
        total += deleted
        if deleted < batch:
            break
    return total


class Housekeeper:
    def __init__(
        self,
        uow: Callable[..., OrdersUnitOfWork],
        retention_s: float,
        interval_s: float = 5.0,
        batch: int = 1000,
        on_backlog: BacklogObserver | None = None,
        saga_timeout_s: float | None = None,
        on_commit: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
        keep_statistics: bool | None = None,
    ) -> None:
        """`keep_statistics`: ANALYZE stale tables (see `refresh_statistics`); None: on
        PostgreSQL when its autovacuum is off (found at the first pass)."""
        self._uow = uow
        self._retention = timedelta(seconds=retention_s)
        self._interval_s = interval_s
        self._batch = batch
        self._on_backlog = on_backlog
        self._saga_timeout = timedelta(seconds=saga_timeout_s) if saga_timeout_s else None
        self._on_commit = on_commit
        self._clock = clock
        self._keep_statistics = keep_statistics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def purge_once(self) -> int:
        """Delete DONE rows older than the retention, one bounded batch per transaction."""
        total = purge_done(self._uow, self._clock() - self._retention, self._batch, self._stop)
        if total:
            log.info("deleted %d DONE outbox events older than %s", total, self._retention)
        return total

    def sweep_expired_sagas(self) -> int:
        """Fail PENDING orders older than the saga timeout; returns how many were swept."""
        if self._saga_timeout is None:
            return 0
        now = self._clock()
        swept = 0
        with self._uow(write=False) as uow:
            stuck = uow.orders.pending_since(self._saga_timeout, self._batch, now)
        for order in stuck:
            expired, event = order.expire(now)
            with self._uow() as uow:
                if uow.orders.save(expired):
                    uow.outbox.add([event], None, now)
                    uow.commit()
                    swept += 1
        if swept:
            log.warning("swept %d order(s) whose saga outlived its timeout of %s", swept, self._saga_timeout)
            self._on_commit()
        return swept

    def refresh_statistics(self) -> list[str]:
        """ANALYZE the orders tables whose statistics are stale (db.statistics), if this
        housekeeper keeps them; the tables analyzed. Finding none stale is one read."""
        if self._keep_statistics is None:
            self._keep_statistics = self._autovacuum_off()
            if self._keep_statistics:
                log.info("autovacuum is off: housekeeping analyzes the orders tables itself")
        if not self._keep_statistics:
            return []
        with self._uow(write=False, single_statement=True) as uow:
            tables = statistics.stale(uow.connection, statistics.ORDERS_TABLES)
        if tables:
            with self._uow() as uow:
                for table in tables:
                    statistics.analyze(uow.connection, table)
                uow.commit()
        return tables

    def _autovacuum_off(self) -> bool:
        """On PostgreSQL, whether the database's autovacuum is off; False elsewhere."""
        with self._uow(write=False, single_statement=True) as uow:
            return statistics.need_keeping(uow.connection)

    def observe_backlog(self) -> tuple[int, float]:
        with self._uow(write=False) as uow:
            pending, oldest_age_s = uow.outbox.backlog(self._clock())
        if self._on_backlog is not None:
            self._on_backlog(pending, oldest_age_s)
        return pending, oldest_age_s

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.observe_backlog()
                self.purge_once()
                self.sweep_expired_sagas()
                self.refresh_statistics()
            except Exception as error:
                log.warning("housekeeping failed: %s: %s", type(error).__name__, str(error).splitlines()[0])
