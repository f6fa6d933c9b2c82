"""What a handler answers the dispatcher, and the retry delay a failed attempt waits.

A handler returns a verdict; the dispatcher writes it back fenced on the lease (`db.outbox`):

- `Done`: handled; marked DONE with the dispatcher's next round (in a batch).
- `Completed`: the handler marked its event DONE itself, in the commit of its own writes.
- `Retry`: a transient failure; again after `backoff_s`, and DEAD once `max_attempts` are used.
- `Defer`: not now (breaker open, rate limited); the attempt its claim counted is given back.

A handler that raises is a `Retry` with the error's text (`describe`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from db.outbox import ClaimedEvent


@dataclass(frozen=True)
class Done:
    """The event is handled; never run it again."""


@dataclass(frozen=True)
class Completed:
    """The handler marked the event DONE itself, in the transaction of its own writes, fenced on the
    lease (`OutboxStore.complete`). `kept=False`: the lease had passed to another process, so the
    handler wrote nothing."""

    kept: bool = True


@dataclass(frozen=True)
class Retry:
    """A transient failure: run again after a backoff; the attempt stays counted."""

    error: str


@dataclass(frozen=True)
class Defer:
    """Not now (breaker open, rate limited): run again after `delay_s`; not an attempt."""

    delay_s: float
    reason: str


Verdict = Done | Completed | Retry | Defer
Handler = Callable[[ClaimedEvent], Verdict]
# Runs several events of one type together (a round's, see saga.dispatcher): verdicts by event
# id. The events it leaves out, the dispatcher runs one by one through the type's `Handler`.
BatchHandler = Callable[[Sequence[ClaimedEvent]], Mapping[int, Verdict]]


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay after failed attempt `attempt` (1 for the first): exponential, capped, with "equal
    jitter" (half fixed, half random) so that retries of many events spread out but never come
    back at once."""
    ceiling = min(max_s, base_s * 2.0 ** max(attempt - 1, 0))
    return ceiling / 2 + float((rng or random).uniform(0, ceiling / 2))


def describe(error: BaseException) -> str:
    """An error as one short line: its type and the first line of its message."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:500]
