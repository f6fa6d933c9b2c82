"""In-process wake-ups: a commit tells the dispatcher and order watchers to look again now."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Protocol

from db.outbox import ClaimedEvent, Lease
from domain.model import Order, OrderStatus, Settlement


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
    for every order ever changed (up to 100,000 of them) grew a busy server by megabytes.

    It also keeps the orders as this process's own commits left them, for a short while
    (`recent`): a watcher that opens or checks right after such a commit sends the order from
    here instead of reading it back. What it keeps is never newer than the database, and it
    drops an order when it hears of a change it was not shown (`publish` of the id: a commit
    whose result it does not have, another process's notification), so a watcher falls back to
    reading. A change it never hears of (another process, a lost notification) can leave it
    behind for at most `recent_s`; a watcher then sends that earlier version first and the later
    one at its next check, as it would had it opened before the change."""

    def __init__(
        self, recent_s: float = 2.0, recent_max: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[str, list[Callable[[], None]]] = {}
        self._closed = False
        self._recent: OrderedDict[str, tuple[float, Order]] = OrderedDict()  # by id, oldest first
        self._recent_s = recent_s
        self._recent_max = recent_max
        self._clock = clock

    def remember(self, order: Order) -> None:
        """`order` as this process just committed it (nobody can be listening yet: a new order)."""
        with self._lock:
            self._keep(order)

    def recent(self, order_id: str) -> Order | None:
        """The order as this process's latest commit of it left it, if that was under `recent_s` ago."""
        with self._lock:
            kept = self._recent.get(order_id)
        if kept is None or self._clock() - kept[0] > self._recent_s:
            return None
        return kept[1]

    def _keep(self, order: Order) -> None:
        """Under the lock."""
        kept = self._recent.pop(order.order_id, None)
        if kept is not None and kept[1].version > order.version:
            order = kept[1]  # two commits' announcements crossed: the later version stays
        self._recent[order.order_id] = (self._clock(), order)
        while len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

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
        """The orders changed, to what is not known here: listeners read them."""
        with self._lock:
            listeners: list[Callable[[], None]] = []
            for order_id in order_ids:
                self._recent.pop(order_id, None)
                listeners.extend(self._listeners.get(order_id, ()))
        for listener in listeners:
            listener()

    def publish_settled(self, order_id: str, settlement: Settlement, at: datetime) -> None:
        """The saga settled the order (PENDING, version 1, to `settlement`, one version up, at
        `at`): listeners may take it from `recent` when the placed order is kept here."""
        with self._lock:
            kept = self._recent.pop(order_id, None)
            if kept is not None and kept[1].status is OrderStatus.PENDING:
                self._keep(kept[1].settle(settlement, at))
            listeners = list(self._listeners.get(order_id, ()))
        for listener in listeners:
            listener()

    def publish_order(self, order: Order) -> None:
        """The order changed, to `order` (this process's commit): listeners may take it from `recent`."""
        with self._lock:
            self._keep(order)
            listeners = list(self._listeners.get(order.order_id, ()))
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

    def order_changed(self, order_id: str, order: Order | None = None) -> None:
        """The order changed (to `order`, when the committer has it whole)."""
        if order is None:
            self._changes.publish([order_id])
        else:
            self._changes.publish_order(order)
        if self._remote is not None:
            self._remote.order_changed(order_id)

    def order_settled(self, order_id: str, settlement: Settlement, at: datetime) -> None:
        """The saga settled the order (see `OrderChanges.publish_settled`)."""
        self._changes.publish_settled(order_id, settlement, at)
        if self._remote is not None:
            self._remote.order_changed(order_id)

    def order_placed(self, order: Order) -> None:
        """A new order committed: nobody listens yet, but a WatchOrder right after will want it."""
        self._changes.remember(order)
