"""The process's log set-up (server.logs.configure): records are stamped in the thread that logs
them and written by one writer thread. What a reader of the log sees must not change: every line
arrives, in order per thread, with the correlation id and thread name of the code that logged it,
exception text included, and nothing is left unwritten once logging shuts down."""

from __future__ import annotations

import io
import json
import logging
import threading
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from domain import correlation
from server import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A buffer for `configure` to write to; the previous root handlers and level come back
    afterwards (pytest's own capture lives there)."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def _flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.close()  # writes what is queued, then stops the writer thread


def test_lines_of_many_threads_all_arrive_stamped_with_their_own_ids(captured: io.StringIO) -> None:
    logs.configure("INFO", "json", captured)
    log = logging.getLogger("orders.test")
    threads, per_thread = 8, 200

    def work(n: int) -> None:
        with correlation.bound(f"corr-{n}", f"order-{n}"):
            for i in range(per_thread):
                log.info("line %d of %d", i, n)

    workers = [threading.Thread(target=work, args=(n,), name=f"worker_{n}") for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    _flush()

    entries = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert len(entries) == threads * per_thread
    for n in range(threads):
        mine = [e for e in entries if e["thread"] == f"worker_{n}"]
        assert [e["message"] for e in mine] == [f"line {i} of {n}" for i in range(per_thread)]
        assert {(e["correlation_id"], e["order_id"]) for e in mine} == {(f"corr-{n}", f"order-{n}")}


def test_the_message_is_taken_when_logged_not_when_written(captured: io.StringIO) -> None:
    logs.configure("INFO", "text", captured)
    items = ["first"]
    logging.getLogger("orders.test").info("items %s", items)
    items.append("changed after the call")  # the writer thread may not have run yet
    _flush()
    assert "items ['first']" in captured.getvalue()
    assert "changed after the call" not in captured.getvalue()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_an_exception_keeps_its_traceback(captured: io.StringIO, fmt: str) -> None:
    logs.configure("INFO", fmt, captured)
    try:
        raise ValueError("the cause")
    except ValueError:
        logging.getLogger("orders.test").exception("it failed")
    _flush()
    out = captured.getvalue()
    assert "it failed" in out
    assert "Traceback" in out and "ValueError: the cause" in out


def test_logging_shutdown_writes_what_was_queued(captured: io.StringIO) -> None:
    """What `os._exit` paths rely on (server.faults.maybe_crash, server.main): shut logging down and
    every line logged before is out."""
    logs.configure("INFO", "text", captured)
    log = logging.getLogger("orders.test")
    for i in range(500):
        log.info("queued %d", i)
    # As at exit, limited to the handler under test: pytest's own handlers must stay open.
    logging.shutdown([weakref.ref(h) for h in logging.getLogger().handlers])
    lines = captured.getvalue().splitlines()
    assert len(lines) == 500 and lines[-1].endswith("queued 499")


MOMENTS = [1_796_000_000.0, 1_796_000_000.999_999, 1_796_000_001.5, 1_796_003_600.042]


@pytest.mark.parametrize("created", MOMENTS)
def test_timestamps_read_as_the_stdlib_writes_them(created: float) -> None:
    """The formatters make the part down to the second once per second; every line's time must
    still be what logging.Formatter (text) and datetime.isoformat (json) would write."""
    record = logging.makeLogRecord({"msg": "m", "created": created, "msecs": (created - int(created)) * 1000})
    record.correlation_id = record.order_id = "-"
    text, reference = logs.TextFormatter(), logging.Formatter(logs.TEXT_FORMAT)
    for _ in range(2):  # the second time from the kept second
        assert text.format(record) == reference.format(record)
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="microseconds")
    fmt = logs.JsonFormatter()
    for _ in range(2):
        assert json.loads(fmt.format(record))["time"][:26] == expected[:26]
