"""Operators' tools: list, inspect and replay dead events, see stuck orders; expired sagas are swept."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from orders_service_api.v1 import orders_pb2 as pb
from sqlalchemy import select, update

from db.engine import make_engine
from db.inventory import InventoryUnitOfWork
from db.outbox import DEAD
from db.tables import outbox_events
from db.unit_of_work import OrdersUnitOfWork
from domain.model import OrderItem
from saga.housekeeping import Housekeeper
from saga.inventory import InventoryParticipant
from tests.invariants import check_invariants, settled
from tests.support import run_cli, wait_until


def _admin(url: str, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    done = run_cli("admin", *args, "--database-url", url, timeout=60)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, lines, done.stderr


def _bury_events_of(url: str, order_id: str) -> int:
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                update(outbox_events)
                .where(outbox_events.c.aggregate_id == order_id)
                .values(status=DEAD, attempts=8, last_error="RuntimeError: inventory exploded")
            )
            return int(
                connection.execute(
                    select(outbox_events.c.id).where(outbox_events.c.aggregate_id == order_id)
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_an_operator_lists_inspects_and_replays_a_dead_event_and_the_order_completes(
    start_server, database_url
):
    api_only = start_server(database_url=database_url, saga_workers=0)
    api_only.stubs.set_stock("ADM-1", 5)
    order = api_only.stubs.place("ops", [("ADM-1", 2)])
    event_id = _bury_events_of(database_url, order.order_id)

    code, dead, _ = _admin(database_url, "dead")
    assert code == 0
    assert [(e["id"], e["aggregate_id"], e["status"]) for e in dead] == [(event_id, order.order_id, "DEAD")]
    assert dead[0]["last_error"] == "RuntimeError: inventory exploded"

    code, shown, _ = _admin(database_url, "show", str(event_id))
    assert code == 0 and json.loads(shown[0]["payload"])["order_id"] == order.order_id

    code, stuck, _ = _admin(database_url, "stuck", "0")
    assert code == 0
    assert stuck[0]["order_id"] == order.order_id
    assert stuck[0]["events"][0]["status"] == "DEAD"

    code, replayed, _ = _admin(database_url, "replay", str(event_id))
    assert code == 0 and replayed == [{"id": event_id, "replayed": True}]

    dispatching = start_server(database_url=database_url)
    wait_until(
        lambda: dispatching.stubs.get(order.order_id).status == pb.ORDER_STATUS_VALIDATED, what="VALIDATED"
    )
    assert _admin(database_url, "dead")[1] == []
    assert _admin(database_url, "replay", "999999")[0] == 1


def test_admin_says_what_is_wrong_in_one_line(sqlite_url):
    code, _, err = _admin(sqlite_url, "dead")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "migrated" in err
    code, _, err = _admin(sqlite_url, "frobnicate")
    assert code == 2 and "usage" in err


def test_a_saga_that_outlived_its_timeout_is_swept_failed_and_its_stock_released(start_server, database_url):
    api_only = start_server(database_url=database_url, saga_workers=0)
    api_only.stubs.set_stock("SWEEP-1", 10)
    order = api_only.stubs.place("ops", [("SWEEP-1", 4)])
    engine = make_engine(database_url)
    try:
        # The saga reserved the stock, then its event died before the order was settled.
        participant = InventoryParticipant(partial(InventoryUnitOfWork, engine))
        participant.reserve(order.order_id, (OrderItem("SWEEP-1", 4),))
        _bury_events_of(database_url, order.order_id)
        assert api_only.stubs.stock("SWEEP-1").reserved == 4

        keeper = Housekeeper(partial(OrdersUnitOfWork, engine), retention_s=3600, saga_timeout_s=0.001)
        assert keeper.sweep_expired_sagas() == 1
        assert keeper.sweep_expired_sagas() == 0
    finally:
        engine.dispose()

    swept = api_only.stubs.get(order.order_id)
    assert (swept.status, swept.failure_reason) == (pb.ORDER_STATUS_FAILED, "saga timed out")
    dispatching = start_server(database_url=database_url)
    wait_until(lambda: dispatching.stubs.stock("SWEEP-1").reserved == 0, what="stock released")
    assert dispatching.stubs.stock("SWEEP-1").available == 10
    wait_until(lambda: settled(database_url), what="outbox settled")
    check_invariants(database_url, database_url, {"SWEEP-1": 10})
