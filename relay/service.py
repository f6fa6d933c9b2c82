"""The event relay of one process: the JetStream publisher, a second outbox dispatcher over the
relay's queue (db.relay) whose handler publishes (relay.handler), and the queue's housekeeping
(DONE rows deleted after their retention, the backlog reported). `start()` once, `stop()` once,
after the saga's dispatcher has stopped, so that the changes it settled while stopping still go out
if the broker answers; what is left stays queued for the next instance."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from db.relay import RelayUnitOfWork
from domain.model import utcnow
from relay.publisher import JetStreamPublisher
from saga.dispatcher import OutboxDispatcher
from saga.housekeeping import purge_done
from saga.resilience import Guard
from saga.verdicts import describe

log = logging.getLogger("orders.relay")

BacklogObserver = Callable[[int, float], None]  # (PENDING events, age of the oldest in seconds)


class RelayHousekeeper:
    """Every `interval_s`: report the backlog, delete DONE rows older than `retention_s`."""

    def __init__(
        self,
        uow: Callable[..., RelayUnitOfWork],
        retention_s: float,
        interval_s: float,
        on_backlog: BacklogObserver,
        batch: int = 1000,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._uow = uow
        self._retention = timedelta(seconds=retention_s)
        self._interval_s = interval_s
        self._on_backlog = on_backlog
        self._batch = batch
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-housekeeping", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def once(self) -> tuple[int, int, float]:
        """(rows deleted, PENDING rows, age of the oldest PENDING in seconds)."""
        deleted = purge_done(self._uow, self._clock() - self._retention, self._batch, self._stop)
        with self._uow(write=False) as uow:
            pending, oldest_s = uow.outbox.backlog(self._clock())
        self._on_backlog(pending, oldest_s)
        return deleted, pending, oldest_s

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.once()
            except Exception as error:
                log.warning("relay housekeeping failed: %s", describe(error))


class EventRelayService:
    def __init__(
        self,
        publisher: JetStreamPublisher,
        dispatcher: OutboxDispatcher | None,
        housekeeper: RelayHousekeeper,
        guard: Guard | None = None,
    ) -> None:
        """`dispatcher` None: this process records changes but publishes none (`--events-workers 0`).
        `guard`: the breaker and limiter the handler publishes through, for metrics and tests."""
        self.publisher = publisher
        self.dispatcher = dispatcher
        self.housekeeper = housekeeper
        self.guard = guard

    def start(self) -> None:
        if self.dispatcher is not None:
            self.publisher.start()
            self.dispatcher.start()
        self.housekeeper.start()

    def stop(self, grace_s: float) -> bool:
        """Stop claiming; publishes in flight get `grace_s`. False if some were still running
        (their leases hand them to another instance, which publishes them again: JetStream drops
        the second message)."""
        finished = True
        if self.dispatcher is not None:
            finished = self.dispatcher.stop(grace_s)
            if not finished:
                log.warning("event publishes still running after %.1fs are left to their leases", grace_s)
        self.housekeeper.stop()
        self.publisher.close()
        return finished
