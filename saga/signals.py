"""In-process wake-ups: a commit tells the dispatcher and order watchers to look again now."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from db.outbox import ClaimedEvent, Lease


class WakeUp:
    """A level-triggered signal for one consumer thread (the dispatcher)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Wait until set or timeout; clears the signal. True if it was set."""
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken


@dataclass
class _Watched:
    generation: int  # changes published since the first watcher came
    watchers: int
    condition: threading.Condition
    listeners: list[Callable[[], None]] = field(default_factory=list)


class OrderChanges:
    """Per-order change counters that watcher threads wait on, or listeners it calls (`subscribe`);
    publishers never block on them.

    A counter exists only while the order is watched (`watching`): a change of an order nobody
    watches leaves nothing behind. Keeping a counter for every order ever changed (up to 100,000
    of them) grew a busy server by megabytes for orders no one would watch.

    Each watched order has its own condition (all on one lock), so a change wakes only the watchers
    of that order: with one condition for all, every change woke every watcher of the process,
    and a busy server spent its time in wake-ups that found nothing new."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[str, _Watched] = {}
        self._closed = False

    @contextmanager
    def watching(self, order_id: str) -> Iterator[None]:
        """Count the order's changes from now until the block ends (for `generation` and `wait`)."""
        with self._lock:
            entry = self._watched.get(order_id)
            if entry is None:
                entry = self._watched[order_id] = _Watched(0, 0, threading.Condition(self._lock))
            entry.watchers += 1
        try:
            yield
        finally:
            with self._lock:
                entry.watchers -= 1
                if entry.watchers == 0:
                    del self._watched[order_id]

    def subscribe(self, order_id: str, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` after each change of the order and at close, until the function returned
        is called. Listeners run in the publisher's thread after the lock is let go: they must
        return at once (hand the work to a thread of their own), as publishers never wait."""
        with self._lock:
            entry = self._watched.get(order_id)
            if entry is None:
                entry = self._watched[order_id] = _Watched(0, 0, threading.Condition(self._lock))
            entry.watchers += 1
            entry.listeners.append(listener)
            closed = self._closed
        subscribed = [True]

        def unsubscribe() -> None:
            with self._lock:
                if not subscribed:
                    return
                subscribed.clear()
                entry.listeners.remove(listener)
                entry.watchers -= 1
                if entry.watchers == 0:
                    del self._watched[order_id]

        if closed:
            listener()
        return unsubscribe

    @property
    def watched(self) -> int:
        """How many orders are watched now."""
        with self._lock:
            return len(self._watched)

    def generation(self, order_id: str) -> int:
        with self._lock:
            entry = self._watched.get(order_id)
            return entry.generation if entry is not None else 0

    def publish(self, order_ids: Iterable[str]) -> None:
        listeners: list[Callable[[], None]] = []
        with self._lock:
            for order_id in order_ids:
                entry = self._watched.get(order_id)
                if entry is not None:
                    entry.generation += 1
                    entry.condition.notify_all()
                    listeners.extend(entry.listeners)
        for listener in listeners:
            listener()

    def wait(self, order_id: str, since: int, timeout: float) -> int:
        """Inside `watching(order_id)`: block until the order's counter moves past `since`, the hub
        closes, or timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            entry = self._watched.get(order_id)
            if entry is None:
                raise RuntimeError(f"order {order_id} is not being watched")
            while not self._closed and entry.generation == since:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                entry.condition.wait(left)
            return entry.generation

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Wake every waiter and listener for good (server shutdown)."""
        listeners: list[Callable[[], None]] = []
        with self._lock:
            self._closed = True
            for entry in self._watched.values():
                entry.condition.notify_all()
                listeners.extend(entry.listeners)
        for listener in listeners:
            listener()


class Handoff(Protocol):
    """The local dispatcher's hand-off (saga.dispatcher.OutboxDispatcher)."""

    def take_slots(self, count: int) -> Lease | None: ...

    def return_slots(self, lease: Lease) -> None: ...

    def hand(
        self, lease: Lease, events: Sequence[ClaimedEvent], committed_at: datetime | None = None
    ) -> None: ...

    def note_committed(self, aggregate_id: str) -> None: ...


class RemoteNotifier(Protocol):
    def outbox_committed(self) -> None: ...

    def order_changed(self, order_id: str) -> None: ...


class CommitSignals:
    """What a commit tells others: the local dispatcher and watchers at once, other processes
    through the (optional) remote notifier."""

    def __init__(
        self,
        wake: WakeUp,
        changes: OrderChanges,
        remote: RemoteNotifier | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        self._wake = wake
        self._changes = changes
        self._remote = remote
        self._handoff = handoff

    def lease_new_events(self, count: int) -> Lease | None:
        """A lease for `count` events about to be committed, if the local dispatcher can run them
        at once (see `events_committed`); None otherwise."""
        return self._handoff.take_slots(count) if self._handoff is not None else None

    def events_committed(
        self, lease: Lease | None, events: Sequence[ClaimedEvent], committed_at: datetime | None = None
    ) -> None:
        """Outbox events committed (at `committed_at`): under a lease, straight to the local
        dispatcher (no other process may take them, so nobody else is told); else the usual
        wake-up and notification."""
        if lease is not None and self._handoff is not None:
            self._handoff.hand(lease, events, committed_at)
        else:
            self.outbox_committed()

    def lease_unused(self, lease: Lease | None) -> None:
        """The events of `lease` were not committed."""
        if lease is not None and self._handoff is not None:
            self._handoff.return_slots(lease)

    def outbox_committed(self, aggregate_id: str | None = None) -> None:
        """Events were committed (of `aggregate_id`, when one order's): claim them."""
        if aggregate_id is not None and self._handoff is not None:
            self._handoff.note_committed(aggregate_id)
        self._wake.set()
        if self._remote is not None:
            self._remote.outbox_committed()

    def order_changed(self, order_id: str) -> None:
        self._changes.publish([order_id])
        if self._remote is not None:
            self._remote.order_changed(order_id)
