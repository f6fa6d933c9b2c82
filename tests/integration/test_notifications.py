"""LISTEN/NOTIFY across processes: a listener hears other processes' notifications, not its own."""

from __future__ import annotations

import queue
import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from sqlalchemy import Engine, create_engine

from db.notifications import LISTENER_APPLICATION, ORDERS_CHANNEL, Listener, Notifier, listener_name

pytestmark = pytest.mark.postgres


@pytest.fixture
def engine(make_pg_database: Callable[[], str]) -> Iterator[Engine]:
    engine = create_engine(make_pg_database())
    yield engine
    engine.dispose()


def _listening(
    engine: Engine,
    sent_locally: Callable[[int], bool] = lambda _pid: False,
    application_name: str = LISTENER_APPLICATION,
) -> tuple[Listener, queue.Queue[str]]:
    heard: queue.Queue[str] = queue.Queue()
    ready: queue.Queue[None] = queue.Queue()

    def on_orders(order_ids: list[str]) -> None:
        for order_id in order_ids:
            heard.put(order_id)

    # on_outbox fires once LISTEN is in place
    listener = Listener(
        engine,
        lambda: ready.put(None),
        on_orders,
        sent_locally=sent_locally,
        application_name=application_name,
    )
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


def _observer(engine: Engine) -> Any:
    """A LISTEN connection that is no peer (not named like a listener): it hears every NOTIFY."""
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    connection = psycopg2.connect(*args, **{**kwargs, "application_name": "observer"})
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"LISTEN {ORDERS_CHANNEL}")
    return connection


def _heard(connection: Any, timeout: float) -> list[str]:
    if select.select([connection], [], [], timeout)[0]:
        connection.poll()
    payloads = [note.payload for note in connection.notifies]
    connection.notifies.clear()
    return payloads


def test_a_notifier_sends_nothing_until_another_process_listens(engine: Engine) -> None:
    own_name = listener_name()
    notifier = Notifier(engine, own_listener=own_name, peer_check_s=0.2)
    notifier.start()
    own, _heard_by_own = _listening(engine, sent_locally=notifier.sent_by_me, application_name=own_name)
    observer = _observer(engine)
    peer: Listener | None = None
    try:
        # Only this process's own listener is connected: the change is dropped, not sent.
        notifier.order_changed("unheard")
        deadline = time.monotonic() + 10
        while notifier.unsent == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (notifier.unsent, notifier.sent) == (1, 0)

        peer, _heard_by_peer = _listening(engine)  # another process's listener
        heard: list[str] = []
        while not heard and time.monotonic() < deadline:  # the notifier looks again after 0.2 s
            notifier.order_changed("heard")
            heard = _heard(observer, 0.05)
        # Delivery is in commit order: had "unheard" been sent, it would come first. (The
        # notifier's `sent` count is not checked here: it moves just after the NOTIFY, which the
        # observer may already have heard.)
        assert heard and heard[0] == "heard"
    finally:
        if peer is not None:
            peer.stop()
        own.stop()
        observer.close()
        notifier.stop()
