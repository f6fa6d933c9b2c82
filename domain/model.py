"""The Order aggregate, its items and its state machine."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from domain.errors import InvalidTransitionError
from domain.events import DomainEvent, OrderCancelled, OrderExpired, OrderPlaced

SAGA_TIMED_OUT = "saga timed out"


class OrderStatus(enum.Enum):
    PENDING = "PENDING"
    VALIDATED = "VALIDATED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_settled(self) -> bool:
        """Settled as far as the saga is concerned: nothing more happens without a client's call."""
        return self is not OrderStatus.PENDING


# The whole state machine: from -> the states it may move to.
TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.PENDING: frozenset({OrderStatus.VALIDATED, OrderStatus.FAILED, OrderStatus.CANCELLED}),
    OrderStatus.VALIDATED: frozenset({OrderStatus.CANCELLED}),
    OrderStatus.FAILED: frozenset(),
    OrderStatus.CANCELLED: frozenset(),
}


def can_move(source: OrderStatus, target: OrderStatus) -> bool:
    return target in TRANSITIONS[source]


@dataclass(frozen=True)
class Settlement:
    """The saga's outcome for a PENDING order, checked against the state machine when it is made:
    the status the order moves to, and why when that is FAILED. The saga writes it without reading
    the order; the store's compare-and-set on PENDING only guards it (`Order.settle` applies the
    same settlement to an order in memory)."""

    status: OrderStatus
    reason: str = ""

    def __post_init__(self) -> None:
        if not can_move(OrderStatus.PENDING, self.status) or self.status is OrderStatus.CANCELLED:
            raise InvalidTransitionError(f"the saga cannot settle an order as {self.status.value}")
        if (self.status is OrderStatus.FAILED) != bool(self.reason):
            raise ValueError("a failed settlement needs a reason, and only a failed one has one")

    @classmethod
    def validated(cls) -> Settlement:
        return cls(OrderStatus.VALIDATED)

    @classmethod
    def failed(cls, reason: str) -> Settlement:
        return cls(OrderStatus.FAILED, reason)


@dataclass(frozen=True)
class OrderItem:
    sku: str
    quantity: int


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Order:
    """An order and its optimistic-lock `version`; every change returns a new Order one version up.

    Changes also return the domain events they raise, for the caller to store in the outbox in the
    same transaction.
    """

    order_id: str
    customer_id: str
    items: tuple[OrderItem, ...]
    status: OrderStatus
    version: int
    create_time: datetime
    update_time: datetime
    failure_reason: str = ""
    request_id: str | None = field(default=None, compare=False)

    @classmethod
    def place(
        cls,
        customer_id: str,
        items: tuple[OrderItem, ...],
        request_id: str | None = None,
        now: datetime | None = None,
    ) -> tuple[Order, OrderPlaced]:
        moment = now or utcnow()
        order = cls(
            order_id=str(uuid.uuid4()),
            customer_id=customer_id,
            items=items,
            status=OrderStatus.PENDING,
            version=1,
            create_time=moment,
            update_time=moment,
            request_id=request_id,
        )
        return order, OrderPlaced(order_id=order.order_id, customer_id=customer_id, items=items)

    def _move(self, target: OrderStatus, now: datetime | None, reason: str = "") -> Order:
        if not can_move(self.status, target):
            raise InvalidTransitionError(
                f"order {self.order_id} is {self.status.value} and cannot become {target.value}"
            )
        return replace(
            self, status=target, version=self.version + 1, update_time=now or utcnow(), failure_reason=reason
        )

    def cancel(self, now: datetime | None = None) -> tuple[Order, DomainEvent]:
        cancelled = self._move(OrderStatus.CANCELLED, now)
        return cancelled, OrderCancelled(order_id=self.order_id)

    def expire(self, now: datetime | None = None) -> tuple[Order, DomainEvent]:
        """A PENDING order the saga did not settle in time: FAILED, and its stock to be released."""
        return self._move(OrderStatus.FAILED, now, reason=SAGA_TIMED_OUT), OrderExpired(
            order_id=self.order_id
        )

    def settle(self, settlement: Settlement, now: datetime | None = None) -> Order:
        """The saga's outcome: only a PENDING order settles."""
        if self.status is not OrderStatus.PENDING:
            raise InvalidTransitionError(
                f"order {self.order_id} is {self.status.value} and cannot become {settlement.status.value}"
            )
        return self._move(settlement.status, now, reason=settlement.reason)
