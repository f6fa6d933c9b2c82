"""DONE outbox rows are deleted in bounded batches once their retention has passed."""

from datetime import UTC, datetime, timedelta
from functools import partial

from sqlalchemy import func, select

from db.engine import make_engine
from db.tables import outbox_events
from db.unit_of_work import OrdersUnitOfWork
from saga.housekeeping import Housekeeper

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
            left = dict(
                connection.execute(
                    select(outbox_events.c.status, func.count()).group_by(outbox_events.c.status)
                ).all()
            )
        assert left == {"DONE": 2, "PENDING": 1}
        assert keeper.observe_backlog()[0] == 1
    finally:
        engine.dispose()
