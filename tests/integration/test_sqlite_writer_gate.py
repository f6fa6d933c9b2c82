"""SQLite writers of one process queue on the writer gate (db.engine.WriterGate) instead of
SQLite's sleeping busy handler: a waiter past its deadline gets DEADLINE_EXCEEDED, and a writer
that fails still lets the next one in."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import event

from db.engine import make_engine, writer_gate
from db.unit_of_work import OrdersUnitOfWork
from domain.deadline import deadline_bound
from domain.errors import DeadlineExceededError
from domain.model import utcnow


@pytest.fixture
def engine(sqlite_url: str):
    from tests.support import apply_schema

    engine = make_engine(apply_schema(sqlite_url))
    yield engine
    engine.dispose()


def _hold_a_writer(engine, release: threading.Event, holding: threading.Event) -> threading.Thread:
    def hold() -> None:
        with OrdersUnitOfWork(engine) as uow:
            uow.outbox.add_raw("held", "TEST", "{}", {}, utcnow())
            holding.set()
            release.wait(10)
            uow.commit()

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(10)
    return thread


def _write_in_thread(engine, deadline_s: float | None) -> list[object]:
    outcome: list[object] = []

    def write() -> None:
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        try:
            with deadline_bound(deadline), OrdersUnitOfWork(engine) as uow:
                uow.outbox.add_raw("waiting", "TEST", "{}", {}, utcnow())
                uow.commit()
            outcome.append("written")
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join(15)
    return outcome


def test_a_writer_waits_for_the_gate_no_longer_than_its_deadline(engine):
    assert writer_gate(engine) is not None
    begun: list[str] = []

    def count_begins(_conn) -> None:  # the engine's own hook sends BEGIN on the driver's connection
        begun.append("BEGIN")

    event.listen(engine, "begin", count_begins)
    release, holding = threading.Event(), threading.Event()
    holder = _hold_a_writer(engine, release, holding)
    try:
        (outcome,) = _write_in_thread(engine, deadline_s=0.2)
        assert isinstance(outcome, DeadlineExceededError)
        # It waited at the gate, not in SQLite: only the holder ever began a transaction (without
        # the gate, the waiter would begin and give up in SQLite's busy handler, same status).
        assert len(begun) == 1
    finally:
        release.set()
        holder.join(10)
    assert _write_in_thread(engine, deadline_s=None) == ["written"]


def test_a_failed_writer_lets_the_next_one_in(engine):
    with pytest.raises(RuntimeError), OrdersUnitOfWork(engine) as uow:
        uow.outbox.add_raw("failed", "TEST", "{}", {}, utcnow())
        raise RuntimeError("the writer fails mid-transaction")
    assert _write_in_thread(engine, deadline_s=2.0) == ["written"]


@pytest.mark.postgres
def test_postgres_engines_have_no_gate(make_pg_database):
    engine = make_engine(make_pg_database())
    try:
        assert writer_gate(engine) is None
    finally:
        engine.dispose()
