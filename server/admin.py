"""`orders-server admin ...`: what an operator needs for dead events and stuck orders.

    orders-server admin dead                 DEAD outbox events, one JSON object a line
    orders-server admin show EVENT_ID        one event, payload and last error included
    orders-server admin replay EVENT_ID...   put DEAD events back to PENDING, attempts reset
    orders-server admin stuck [SECONDS]      PENDING orders older than SECONDS (default: the saga timeout)

It talks to the configured orders database directly (same flags and ORDERS_* variables as the
server), so it works while every server is down. Output is JSON lines, for people and for jq.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TextIO

from db.engine import make_engine
from db.outbox import DEAD
from db.unit_of_work import OrdersUnitOfWork
from domain.errors import DomainError
from domain.model import utcnow
from server.config import Settings

USAGE = "usage: orders-server admin {dead | show EVENT_ID | replay EVENT_ID... | stuck [SECONDS]}"


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


def run(settings: Settings, args: Sequence[str], out: TextIO = sys.stdout) -> int:
    try:
        return _run(settings, args, out)
    except DomainError as error:
        print(f"orders-server admin: {error} (is the database reachable and migrated?)", file=sys.stderr)
        return 1


def _run(settings: Settings, args: Sequence[str], out: TextIO) -> int:
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    action, rest = args[0], list(args[1:])
    engine = make_engine(settings.database_url)
    uow = partial(OrdersUnitOfWork, engine)
    try:
        if action == "dead" and not rest:
            with uow(write=False) as work:
                for row in work.outbox.rows(status=DEAD, limit=1000):
                    entry = asdict(row)
                    entry.pop("payload")
                    print(_json(entry), file=out)
            return 0
        if action == "show" and len(rest) == 1 and rest[0].isdigit():
            with uow(write=False) as work:
                found = [r for r in work.outbox.rows(event_id=int(rest[0]), limit=1)]
            if not found:
                print(f"no outbox event {rest[0]}", file=sys.stderr)
                return 1
            print(_json(asdict(found[0])), file=out)
            return 0
        if action == "replay" and rest and all(r.isdigit() for r in rest):
            missing = 0
            for event_id in rest:
                with uow() as work:
                    replayed = work.outbox.replay(int(event_id), utcnow())
                    work.commit()
                print(_json({"id": int(event_id), "replayed": replayed}), file=out)
                missing += not replayed
            return 1 if missing else 0
        if action == "stuck" and len(rest) <= 1:
            older_than = float(rest[0]) if rest else settings.saga_timeout_s
            with uow(write=False) as work:
                orders = work.orders.pending_since(timedelta(seconds=older_than), 1000, utcnow())
                for order in orders:
                    events = work.outbox.rows(aggregate_id=order.order_id)
                    print(
                        _json(
                            {
                                "order_id": order.order_id,
                                "customer_id": order.customer_id,
                                "create_time": order.create_time,
                                "events": [
                                    {
                                        "id": e.id,
                                        "type": e.event_type,
                                        "status": e.status,
                                        "attempts": e.attempts,
                                        "last_error": e.last_error,
                                    }
                                    for e in events
                                ],
                            }
                        ),
                        file=out,
                    )
            return 0
        print(USAGE, file=sys.stderr)
        return 2
    finally:
        engine.dispose()
