"""What the outbox dispatcher (saga.dispatcher) needs of a queue of events and of the unit of work
that reaches it: the outbox (`db.outbox.OutboxStore` in `db.unit_of_work.OrdersUnitOfWork`) is
one, the event relay's queue (`db.relay.RelayQueue` in `db.relay.RelayUnitOfWork`) another. Each
claims events under a lease (`ClaimedEvent`) and fences every later write on it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Protocol, Self

from db.outbox import ClaimedEvent


class EventQueue(Protocol):
    def complete_and_claim(
        self, finished: Sequence[ClaimedEvent], limit: int, lease: timedelta, now: datetime
    ) -> tuple[set[int], list[ClaimedEvent]]:
        """Mark `finished` DONE (fenced), then lease up to `limit` due events: the ids marked, and
        the events leased."""
        ...

    def renew(self, events: Sequence[ClaimedEvent], lease: timedelta, now: datetime) -> set[int]:
        """Extend the leases still held; the ids renewed."""
        ...

    def reschedule(
        self, event: ClaimedEvent, delay_s: float, now: datetime, error: str | None, count_attempt: bool
    ) -> bool:
        """Back to PENDING after `delay_s` (fenced); a deferral gives its attempt back."""
        ...

    def bury(self, event: ClaimedEvent, error: str | None, now: datetime) -> bool:
        """DEAD (fenced)."""
        ...


class QueueUnitOfWork(Protocol):
    """A transaction that reaches a queue as `outbox`: rolled back unless `commit()` is called."""

    @property
    def outbox(self) -> EventQueue: ...

    def commit(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


# Called with `single_statement=True` for the dispatcher's rounds and lease renewals.
QueueUowFactory = Callable[..., QueueUnitOfWork]
