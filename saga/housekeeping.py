"""Housekeeping: delete DONE outbox rows after their retention, in bounded batches, and report
the backlog. One thread per process; every instance may run it (deletes are idempotent)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from db.unit_of_work import OrdersUnitOfWork
from domain.model import utcnow

log = logging.getLogger("orders.housekeeping")

BacklogObserver = Callable[[int, float], None]  # (pending events, oldest pending age in seconds)


class Housekeeper:
    def __init__(
        self,
        uow: Callable[..., OrdersUnitOfWork],
        retention_s: float,
        interval_s: float = 5.0,
        batch: int = 1000,
        on_backlog: BacklogObserver | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._uow = uow
        self._retention = timedelta(seconds=retention_s)
        self._interval_s = interval_s
        self._batch = batch
        self._on_backlog = on_backlog
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def purge_once(self) -> int:
        """Delete DONE rows older than the retention, one bounded batch per transaction."""
        total = 0
        cutoff = self._clock() - self._retention
        while not self._stop.is_set():
            with self._uow() as uow:
                deleted = uow.outbox.purge_done(cutoff, self._batch)
                uow.commit()
            total += deleted
            if deleted < self._batch:
                break
        if total:
            log.info("deleted %d DONE outbox events older than %s", total, self._retention)
        return total

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
            except Exception as error:
                log.warning("housekeeping failed: %s: %s", type(error).__name__, str(error).splitlines()[0])
