"""Stock and reservation values, and the words the saga uses for its outcomes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StockLevel:
    sku: str
    available: int
    reserved: int
    version: int


@dataclass(frozen=True)
class Reserved:
    """Every item of the order is reserved: now (`fresh`, to commit), or by an earlier delivery of
    the same event (nothing to write)."""

    fresh: bool = True


@dataclass(frozen=True)
class Rejected:
    """Nothing was reserved: a business outcome, not a failure of the inventory."""

    reason: str


@dataclass(frozen=True)
class Superseded:
    """A newer saga step of the order has written in the inventory: this one, whose lease has
    passed to that step, wrote nothing."""


ReservationOutcome = Reserved | Rejected | Superseded


def unknown_sku(sku: str) -> Rejected:
    return Rejected(f"unknown SKU {sku!r}")


def insufficient_stock(sku: str, requested: int, available: int) -> Rejected:
    return Rejected(f"insufficient stock for SKU {sku!r}: requested {requested}, available {available}")
