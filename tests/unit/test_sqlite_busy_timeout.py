"""SQLite's busy timeout follows the call's deadline, in quarter seconds above one second, so that
calls whose budgets differ by milliseconds do not each reset it."""

from __future__ import annotations

import time

from db.engine import _sqlite_busy_timeout_ms
from domain.deadline import deadline_bound


def _with_budget(seconds: float | None) -> int:
    deadline = None if seconds is None else time.monotonic() + seconds
    with deadline_bound(deadline):
        return _sqlite_busy_timeout_ms(10_000)


def test_no_deadline_or_a_distant_one_keeps_the_default() -> None:
    assert _with_budget(None) == 10_000
    assert _with_budget(60.0) == 10_000


def test_budgets_above_a_second_round_down_to_a_quarter_second() -> None:
    assert _with_budget(5.2) == 5_000  # 5,199 ms or so: the same value for every such call
    assert _with_budget(1.1) == 1_000


def test_short_budgets_are_kept_to_the_millisecond() -> None:
    assert 380 <= _with_budget(0.4) <= 400
