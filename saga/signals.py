"""In-process wake-ups: a commit tells the dispatcher and order watchers to look again now."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
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


class OrderChanges:
    """Who wants to hear of which order's changes: `subscribe` a listener for an order, `publish`
    calls the listeners of the orders that changed, `close` calls them all for good. Publishers
    never block on listeners, and an order nobody listens to leaves nothing behind: keeping state
    for every order ever changed (up to 100,000 of them) grew a busy server by megabytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[str, list[Callable[[], None]]] = {}
        self._closed = False

    def subscribe(self, order_id: str, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` after each change of the order and at close, until the function returned
        is called. Listeners run in the publisher's thread after the lock is let go: they must
        return at once (hand the work to a thread of their own), as publishers never wait."""
        with self._lock:
            self._listeners.setdefault(order_id, []).append(listener)
            closed = self._closed
        subscribed = [True]

        def unsubscribe() -> None:
            with self._lock:
                if not subscribed:
                    return
                subscribed.clear()
                listeners = self._listeners[order_id]
                listeners.remove(listener)
                if not listeners:
                    del self._listeners[order_id]

        if closed:
            listener()
        return unsubscribe

    @property
    def watched(self) -> int:
        """How many orders someone listens to now."""
        with self._lock:
            return len(self._listeners)

    def publish(self, order_ids: Iterable[str]) -> None:
        with self._lock:
            listeners = [listener for order_id in order_ids for listener in self._listeners.get(order_id, ())]
        for listener in listeners:
            listener()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Call every listener for good (server shutdown); later subscribers are called at once."""
        with self._lock:
            self._closed = True
            listeners = [listener for subscribed in self._listeners.values() for listener in subscribed]
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
