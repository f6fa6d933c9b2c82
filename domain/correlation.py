"""The correlation id of the work in hand, carried by a context variable into every log line.

It lives in the domain layer because every layer (server ingress, outbox headers, saga workers)
reads or restores it, and it depends on nothing but `contextvars`.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

_CORRELATION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)
_ORDER_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("order_id", default=None)

_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def is_valid(value: str | None) -> bool:
    return value is not None and _VALID.fullmatch(value) is not None


def accept_or_new(value: str | None) -> str:
    """The client's id when it is valid (API.md: 1-128 of `[A-Za-z0-9._:-]`), else a new UUID4."""
    return value if value is not None and is_valid(value) else str(uuid.uuid4())


def current() -> str | None:
    return _CORRELATION_ID.get()


def current_order_id() -> str | None:
    return _ORDER_ID.get()


def set_current(correlation_id: str | None) -> None:
    """Set the id for the rest of the current context (a gRPC call, a saga task)."""
    _CORRELATION_ID.set(correlation_id)


def set_order_id(order_id: str | None) -> None:
    _ORDER_ID.set(order_id)


@contextmanager
def bound(correlation_id: str | None, order_id: str | None = None) -> Iterator[None]:
    """Bind ids for the duration of a block and restore the previous ones after it."""
    token = _CORRELATION_ID.set(correlation_id)
    order_token = _ORDER_ID.set(order_id)
    try:
        yield
    finally:
        _ORDER_ID.reset(order_token)
        _CORRELATION_ID.reset(token)
