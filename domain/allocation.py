"""Reserving for a batch of orders at once: who gets the stock, as a pure function of the levels.

The set-based saga locks the stock rows of a whole batch of orders, reads them, and decides here
which orders get their items: order by order in the batch's order (the outbox's event order), each
order all or none, each decision on the stock the earlier orders of the batch left. That is what
the same orders reserved one after another would get, with the same reasons for a refusal: a hot
SKU goes first come, first served, and is never oversold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from domain.fencing import Fence
from domain.inventory import Rejected, Reserved, insufficient_stock, unknown_sku
from domain.model import OrderItem


@dataclass(frozen=True)
class ReservationRequest:
    """One order of a batch: its items, and the fence of the saga step that reserves for it."""

    order_id: str
    items: tuple[OrderItem, ...]
    fence: Fence


@dataclass(frozen=True)
class Allocation:
    """What a batch gets: an outcome per order (in the batch's order) and, per SKU, the total the
    reserved orders take from it."""

    outcomes: dict[str, Reserved | Rejected] = field(default_factory=dict)
    taken: dict[str, int] = field(default_factory=dict)


def allocate(requests: Sequence[ReservationRequest], available: Mapping[str, int]) -> Allocation:
    """Allocate `available` (per SKU; a SKU missing is unknown) to `requests`, in their order."""
    left = dict(available)
    allocation = Allocation()
    for request in requests:
        refusal = refusal_of(request.items, left)
        if refusal is not None:
            allocation.outcomes[request.order_id] = refusal
            continue
        for item in request.items:
            left[item.sku] -= item.quantity
            allocation.taken[item.sku] = allocation.taken.get(item.sku, 0) + item.quantity
        allocation.outcomes[request.order_id] = Reserved()
    return allocation


def refusal_of(items: Sequence[OrderItem], left: Mapping[str, int]) -> Rejected | None:
    """Why `items` cannot all be had from `left`, naming the first SKU short in SKU order (as the
    one-order reservation does); None if they can."""
    for item in sorted(items, key=lambda i: i.sku):
        if item.sku not in left:
            return unknown_sku(item.sku)
        if left[item.sku] < item.quantity:
            return insufficient_stock(item.sku, item.quantity, left[item.sku])
    return None
