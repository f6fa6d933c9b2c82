"""LISTEN/NOTIFY across processes: a listener hears other processes' notifications, not its own."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

import psycopg2
import pytest
from sqlalchemy import Engine, create_engine

from db.notifications import ORDERS_CHANNEL, Listener, Notifier

pytestmark = pytest.mark.postgres


@pytest.fixture
def engine(make_pg_database: Callable[[], str]) -> Iterator[Engine]:
    engine = create_engine(make_pg_database())
    yield engine
    engine.dispose()


def _listening(
    engine: Engine, sent_locally: Callable[[int], bool] = lambda _pid: False
) -> tuple[Listener, queue.Queue[str]]:
    heard: queue.Queue[str] = queue.Queue()
    ready: queue.Queue[None] = queue.Queue()

    def on_orders(order_ids: list[str]) -> None:
        for order_id in order_ids:
            heard.put(order_id)

    # on_outbox fires once LISTEN is in place
    listener = Listener(engine, lambda: ready.put(None), on_orders, sent_locally=sent_locally)
    listener.start()
    ready.get(timeout=10)
    return listener, heard


def _notify_from_elsewhere(engine: Engine, order_id: str) -> None:
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    connection = psycopg2.connect(*args, **kwargs)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", (ORDERS_CHANNEL, order_id))
    finally:
        connection.close()


def test_a_listener_drops_what_its_own_notifier_sent_and_hears_the_rest(engine: Engine) -> None:
    notifier = Notifier(engine)
    notifier.start()
    own, heard_by_own = _listening(engine, sent_locally=notifier.sent_by_me)
    everyone, heard_by_everyone = _listening(engine)
    try:
        notifier.order_changed("mine")
        assert heard_by_everyone.get(timeout=10) == "mine"  # it was sent and delivered
        _notify_from_elsewhere(engine, "theirs")
        # PostgreSQL delivers in commit order: had "mine" reached this listener, it would come first.
        assert heard_by_own.get(timeout=10) == "theirs"
        assert heard_by_everyone.get(timeout=10) == "theirs"
    finally:
        own.stop()
        everyone.stop()
        notifier.stop()
