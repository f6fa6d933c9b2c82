"""On SQLite, a leased event's completion, renewal, rescheduling and burial find it by its primary
key, whatever the backlog.

The completion was matched on `(id, lease_token) IN (...)`, a row value that SQLite's planner does
not look up by key: it searched the status index instead and read every PENDING event, so a saga
step's completion cost in proportion to the backlog (docs/performance.md, "Fourth round"). The
plans below are SQLite's own account of each statement the queue sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event

from db.engine import make_engine
from db.outbox import OutboxStore
from db.queue import ClaimedEvent
from domain.model import utcnow
from tests.support import apply_schema

LEASE = timedelta(seconds=30)


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(apply_schema(sqlite_url))
    yield engine
    engine.dispose()


def _backlog_and_claimed(engine: Engine, pending: int, claimed: int) -> list[ClaimedEvent]:
    """`pending` events, `claimed` of them leased."""
    now = utcnow()
    with engine.begin() as connection:
        store = OutboxStore(connection)
        for n in range(pending):
            store.add_raw(f"o-{n}", "TEST", "{}", {}, now)
        return store.claim(claimed, LEASE, now)


def _plans_of(engine: Engine, work: Callable[[OutboxStore], Any]) -> list[tuple[str, str]]:
    """(statement, SQLite's query plan) of each UPDATE `work` sent."""
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.begin() as connection:
            work(OutboxStore(connection))
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    plans = []
    with engine.connect() as connection:
        for statement, parameters in sent:
            rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
            plans.append((statement, " | ".join(str(row[-1]) for row in rows)))
    return plans


def _assert_by_key(plans: list[tuple[str, str]]) -> None:
    assert plans
    for statement, plan in plans:
        assert "outbox_events USING INTEGER PRIMARY KEY" in plan, (statement, plan)
        assert "status" not in plan, (statement, plan)


def test_a_completion_finds_its_event_by_key_among_many_pending(engine: Engine) -> None:
    first, second, third = _backlog_and_claimed(engine, pending=200, claimed=3)
    now = utcnow()
    answers: list[Any] = []
    plans = _plans_of(
        engine,
        lambda store: answers.extend([store.complete(first, now), store.complete_many([second, third], now)]),
    )
    assert answers == [True, {second.id, third.id}]
    _assert_by_key(plans)


def test_a_renewal_a_reschedule_and_a_burial_find_their_events_by_key(engine: Engine) -> None:
    first, second, third = _backlog_and_claimed(engine, pending=200, claimed=3)
    now = utcnow()
    answers: list[Any] = []

    def work(store: OutboxStore) -> None:
        answers.append(store.renew([first, second], LEASE, now))
        answers.append(store.reschedule(first, 1.0, now, "later", count_attempt=True))
        answers.append(store.bury(second, "gave up", now))
        answers.append(store.complete(third, now))

    plans = _plans_of(engine, work)
    assert answers == [{first.id, second.id}, True, True, True]
    _assert_by_key(plans)
