"""The current call's deadline: a context variable bound by the server for each call.

The units of work turn it into PostgreSQL's `statement_timeout` and SQLite's busy wait, so the
database work of a call whose client gave up is abandoned, not left running (API.md). Like the
correlation id, it travels in the call's context, never as an argument through every layer.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

# time.monotonic() by which the current call must be done, or None.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


@contextmanager
def deadline_bound(deadline: float | None) -> Iterator[None]:
    """Bind `deadline` (a `time.monotonic()` value, or None for none) for the block."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def is_bound() -> bool:
    return _DEADLINE.get() is not None


def remaining_ms() -> int | None:
    """Milliseconds left before the bound deadline (negative once past), or None without one."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return None
    return int((deadline - time.monotonic()) * 1000)
