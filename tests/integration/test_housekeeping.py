"""DONE outbox rows are deleted in bounded batches once their retention has passed; where autovacuum
is off, the orders tables' statistics are refreshed as autovacuum would."""

from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from sqlalchemy import func, select, text

from db.engine import make_engine
from db.tables import outbox_events
from db.unit_of_work import OrdersUnitOfWork
from saga.housekeeping import Housekeeper
from tests.support import apply_schema, wait_until

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _add_done_events(uow_factory, count: int, at: datetime) -> None:
    with uow_factory() as uow:
        for i in range(count):
            uow.outbox.add_raw(f"agg-{at.timestamp()}-{i}", "NOOP", "{}", {}, at)
        uow.commit()
    with uow_factory() as uow:
        for event in uow.outbox.claim(count, timedelta(seconds=30), at):
            assert uow.outbox.complete(event, at)
        uow.commit()


def test_done_events_past_retention_are_deleted_and_recent_ones_kept(migrated_url):
    engine = make_engine(migrated_url)
    try:
        uow_factory = partial(OrdersUnitOfWork, engine)
        _add_done_events(uow_factory, 7, T0)
        _add_done_events(uow_factory, 2, T0 + timedelta(hours=2))
        with uow_factory() as uow:
            uow.outbox.add_raw("still-pending", "NOOP", "{}", {}, T0)
            uow.commit()
        keeper = Housekeeper(
            uow_factory, retention_s=3600, batch=3, clock=lambda: T0 + timedelta(hours=2, minutes=1)
        )

        assert keeper.purge_once() == 7

        with engine.connect() as connection:
            left = {
                status: count
                for status, count in connection.execute(
                    select(outbox_events.c.status, func.count()).group_by(outbox_events.c.status)
                )
            }
        assert left == {"DONE": 2, "PENDING": 1}
        assert keeper.observe_backlog()[0] == 1
    finally:
        engine.dispose()


def _add_pending(uow_factory, count: int) -> None:
    with uow_factory() as uow:
        for i in range(count):
            uow.outbox.add_raw(f"agg-{i}", "NOOP", "{}", {}, T0)
        uow.commit()


def _scalar(engine, sql: str):
    with engine.connect() as connection:
        return connection.execute(text(sql)).scalar_one()


PLANNER_ROWS = "SELECT reltuples FROM pg_class WHERE relname = 'outbox_events'"
CHANGED_ROWS = "SELECT n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = 'outbox_events'"


@pytest.mark.postgres
def test_stale_outbox_statistics_are_refreshed_where_autovacuum_would(make_pg_database):
    engine = make_engine(apply_schema(make_pg_database()))
    try:
        uow_factory = partial(OrdersUnitOfWork, engine)
        keeper = Housekeeper(uow_factory, retention_s=3600, keep_statistics=True)
        assert keeper.refresh_statistics() == []  # nothing changed yet
        _add_pending(uow_factory, 500)
        assert _scalar(engine, PLANNER_ROWS) <= 0  # never analyzed: the planner guesses
        # Row counts reach the statistics views when the writer's backend reports them (within a
        # second or so): until then nothing looks stale.
        analyzed: list[str] = []

        def refreshed() -> list[str]:
            analyzed.extend(keeper.refresh_statistics())
            return analyzed

        wait_until(refreshed, timeout=10)
        assert analyzed == ["outbox_events"]
        assert _scalar(engine, PLANNER_ROWS) == 500
        assert keeper.refresh_statistics() == []  # fresh now
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_statistics_are_kept_by_default_only_where_autovacuum_is_off(make_pg_database):
    engine = make_engine(apply_schema(make_pg_database()))
    try:
        uow_factory = partial(OrdersUnitOfWork, engine)
        keeper = Housekeeper(uow_factory, retention_s=3600)  # decides by the database's setting
        _add_pending(uow_factory, 500)
        autovacuum = _scalar(engine, "SHOW autovacuum")
        wait_until(lambda: _scalar(engine, CHANGED_ROWS) >= 500, timeout=10, what="the stats views")
        expected = ["outbox_events"] if autovacuum == "off" else []
        assert keeper.refresh_statistics() == expected
    finally:
        engine.dispose()
