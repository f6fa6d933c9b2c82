"""WatchOrder: the current order, then each change, until the order settles or the call ends.

Watchers sleep on `OrderChanges` (published after local commits and on PostgreSQL notifications
from other processes); a slow poll is only the safety net for a missed signal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from domain.errors import UnavailableError
from domain.model import Order
from saga.signals import OrderChanges


class OrderWatcher:
    def __init__(
        self, load: Callable[[str], Order], changes: OrderChanges, safety_poll_s: float = 1.0
    ) -> None:
        self._load = load
        self._changes = changes
        self._safety_poll_s = safety_poll_s

    def watch(self, order_id: str, is_active: Callable[[], bool]) -> Iterator[Order]:
        with self._changes.watching(order_id):  # counted from before the first read
            seen = self._changes.generation(order_id)
            order = self._load(order_id)
            yield order
            while not order.status.is_settled and is_active():
                if self._changes.closed:
                    # Ending with OK here would read as "settled" to a client holding a PENDING order.
                    raise UnavailableError("server shutting down: watch again on another instance")
                seen = self._changes.wait(order_id, seen, self._safety_poll_s)
                latest = self._load(order_id)
                if latest.version != order.version:
                    yield latest
                order = latest
