"""Domain events: facts, named in the past tense, stored in the outbox with the change that raised them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from domain.model import OrderItem


@dataclass(frozen=True)
class DomainEvent:
    # The outbox `event_type`: the wire name consumers dispatch on.
    event_type: ClassVar[str]
    order_id: str

    def payload(self) -> dict[str, Any]:
        return {"order_id": self.order_id}


@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    event_type: ClassVar[str] = "ORDER_CREATED"
    customer_id: str
    items: tuple[OrderItem, ...]

    def payload(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "customer_id": self.customer_id,
            "items": [{"sku": i.sku, "quantity": i.quantity} for i in self.items],
        }


@dataclass(frozen=True)
class OrderCancelled(DomainEvent):
    event_type: ClassVar[str] = "ORDER_CANCELLED"


@dataclass(frozen=True)
class OrderExpired(DomainEvent):
    """The saga did not settle the order in time; it was failed and its stock must be released."""

    event_type: ClassVar[str] = "ORDER_EXPIRED"
