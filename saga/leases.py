"""The leases a dispatcher holds: when each runs out here, and their renewal.

The database decides expiry (`db.clock`); this process keeps, per event it holds (queued or
running), a `time.monotonic()` deadline counted from before the statement that took the lease, so
it never thinks a lease longer than the database does. Every third of `lease_s` it extends, in one
statement, the leases held longer than that: a slow step that is alive keeps its event however
long it runs. A lease that ran out is not revived (the database refuses, `OutboxStore.renew`): its
deadline here drops to zero, so a queued event is handed back, not started, and a running step's
writes are fenced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from db.outbox import ClaimedEvent
from db.queue import QueueUowFactory
from saga.verdicts import describe

log = logging.getLogger("orders.dispatcher")


class LeaseKeeper:
    def __init__(
        self,
        uow: QueueUowFactory,
        lease_s: float,
        clock: Callable[[], datetime],
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        """`paused`: while true, nothing is renewed (fault injection: a stalled process)."""
        self._uow = uow
        self._lease_s = lease_s
        self._clock = clock
        self._paused = paused
        self._lock = threading.Lock()
        self._held: dict[int, tuple[ClaimedEvent, float]] = {}
        self._next_renewal = 0.0
        self.renewed = 0

    def hold(self, event: ClaimedEvent, leased_since: float) -> None:
        """`event` is this process's, under a lease taken after `leased_since` (monotonic)."""
        with self._lock:
            self._held[event.id] = (event, leased_since + self._lease_s)

    def release(self, event: ClaimedEvent) -> None:
        with self._lock:
            self._held.pop(event.id, None)

    def ran_out(self, event: ClaimedEvent) -> bool:
        """True once this process can no longer be sure it holds `event`'s lease."""
        with self._lock:
            held = self._held.get(event.id)
        return held is not None and time.monotonic() >= held[1]

    def seconds_to_renewal(self) -> float:
        return max(self._next_renewal - time.monotonic(), 0.01)

    def renew_due(self) -> None:
        """Every third of the lease, extend the leases held for longer than that."""
        now = time.monotonic()
        if now < self._next_renewal or self._paused():
            return
        interval = self._lease_s / 3
        self._next_renewal = now + interval
        with self._lock:
            due = [event for event, until in self._held.values() if until - now < 2 * interval]
        if not due:
            return
        try:
            with self._uow(single_statement=True) as uow:
                renewed = uow.outbox.renew(due, timedelta(seconds=self._lease_s), self._clock())
                uow.commit()
        except Exception as error:
            log.warning("renewing %d lease(s) failed: %s", len(due), describe(error))
            return
        with self._lock:
            self.renewed += len(renewed)
            for event in due:
                if event.id in self._held:
                    until = now + self._lease_s if event.id in renewed else 0.0
                    self._held[event.id] = (event, until)
        for event in due:
            if event.id not in renewed:
                log.warning("event %d: lease ran out or passed to another dispatcher while held", event.id)
