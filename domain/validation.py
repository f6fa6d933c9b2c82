"""Field rules of API.md, checked before anything is stored; every broken rule is reported at once."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from domain.errors import FieldViolation, ValidationError
from domain.model import OrderItem

MAX_CUSTOMER_ID = 128
MAX_ITEMS = 100
MAX_SKU = 64
MAX_QUANTITY = 10_000
MAX_REQUEST_ID = 128
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

_SKU = re.compile(r"[A-Za-z0-9._-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class PlaceOrderCommand:
    """A PlaceOrder request that passed validation, values exactly as sent."""

    customer_id: str
    items: tuple[OrderItem, ...]
    request_id: str | None

    def fingerprint(self) -> str:
        """What makes two requests with one `request_id` "the same payload" (item order ignored)."""
        canonical = json.dumps(
            [self.customer_id, sorted([i.sku, i.quantity] for i in self.items)],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def _raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise ValidationError(violations)


def sku_violations(sku: str, field: str) -> list[FieldViolation]:
    if not sku:
        return [FieldViolation(field, "must not be empty")]
    if len(sku) > MAX_SKU:
        return [FieldViolation(field, f"must be at most {MAX_SKU} characters")]
    if not _SKU.fullmatch(sku):
        return [FieldViolation(field, "may contain only letters, digits, '.', '_' and '-'")]
    return []


def place_order(customer_id: str, items: Sequence[tuple[str, int]], request_id: str) -> PlaceOrderCommand:
    """Check a PlaceOrder request; `request_id` "" means no idempotency key."""
    violations: list[FieldViolation] = []
    if not customer_id:
        violations.append(FieldViolation("customer_id", "must not be empty"))
    elif len(customer_id) > MAX_CUSTOMER_ID:
        violations.append(FieldViolation("customer_id", f"must be at most {MAX_CUSTOMER_ID} characters"))
    elif _CONTROL.search(customer_id):
        violations.append(FieldViolation("customer_id", "must not contain control characters"))
    if not items:
        violations.append(FieldViolation("items", "must contain at least one item"))
    elif len(items) > MAX_ITEMS:
        violations.append(FieldViolation("items", f"must contain at most {MAX_ITEMS} items"))
    else:
        seen: set[str] = set()
        for index, (sku, quantity) in enumerate(items):
            violations += sku_violations(sku, f"items[{index}].sku")
            if sku in seen:
                violations.append(
                    FieldViolation(f"items[{index}].sku", f"SKU {sku!r} appears more than once")
                )
            seen.add(sku)
            if not 1 <= quantity <= MAX_QUANTITY:
                violations.append(
                    FieldViolation(f"items[{index}].quantity", f"must be between 1 and {MAX_QUANTITY}")
                )
    if len(request_id) > MAX_REQUEST_ID:
        violations.append(FieldViolation("request_id", f"must be at most {MAX_REQUEST_ID} characters"))
    elif _CONTROL.search(request_id):  # PostgreSQL refuses NUL in text; SQLite would store it
        violations.append(FieldViolation("request_id", "must not contain control characters"))
    _raise_if(violations)
    return PlaceOrderCommand(
        customer_id=customer_id,
        items=tuple(OrderItem(sku, quantity) for sku, quantity in items),
        request_id=request_id or None,
    )


def order_id(value: str, field: str = "order_id") -> str:
    """A UUID in hyphenated hex form; returned lower-cased, the form ids are stored in."""
    if not value:
        raise ValidationError([FieldViolation(field, "must not be empty")])
    if not _UUID.fullmatch(value):
        raise ValidationError([FieldViolation(field, "must be a UUID in hyphenated hex form")])
    return value.lower()


def expected_version(value: int) -> int | None:
    """0 means "don't check"."""
    if value < 0:
        raise ValidationError([FieldViolation("expected_version", "must not be negative")])
    return value or None


def page_size(value: int) -> int:
    if value < 0:
        raise ValidationError([FieldViolation("page_size", "must not be negative")])
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def customer_filter(value: str) -> str | None:
    if len(value) > MAX_CUSTOMER_ID:
        raise ValidationError(
            [FieldViolation("customer_id", f"must be at most {MAX_CUSTOMER_ID} characters")]
        )
    if _CONTROL.search(value):
        raise ValidationError([FieldViolation("customer_id", "must not contain control characters")])
    return value or None


def sku(value: str, field: str = "sku") -> str:
    _raise_if(sku_violations(value, field))
    return value


def stock_quantity(value: int, field: str = "available") -> int:
    if value < 0:
        raise ValidationError([FieldViolation(field, "must not be negative")])
    return value
