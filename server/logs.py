"""Log set-up: every line carries the correlation id (and order id) of the work that caused it.

The stamping filter sits on the handler, not on a logger, so records propagated from any logger,
in any thread, get the fields; records outside any call get "-".
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from queue import SimpleQueue
from typing import TextIO

from domain import correlation


class CorrelationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = correlation.current() or "-"
        record.order_id = correlation.current_order_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", "-"),
            "order_id": getattr(record, "order_id", "-"),
            "thread": record.threadName,
        }
        # As logging.Formatter does: the traceback's text is formatted once and kept on the record
        # (where it was logged, by _Handoff, or here).
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = (
    "%(asctime)s %(levelname)-7s [%(threadName)s] %(name)s "
    "correlation_id=%(correlation_id)s order_id=%(order_id)s %(message)s"
)


class _Handoff(logging.handlers.QueueHandler):
    """The root handler: the calling thread stamps the record (filters run there, so the context
    variables and the thread name are the caller's) and queues it; one writer thread formats and
    writes. With the stream handler at the root, some thirty threads (gRPC handlers, saga workers)
    took turns on its lock for every line, a saga step two or three times, and each turn was
    another wait for the GIL: the saga's commit-to-dispatch lag halved this way
    (docs/performance.md).

    A line is in the queue, not yet written, for as long as the writer takes to get to it; a
    process killed outright loses what is queued. `close` (`logging.shutdown`: at exit, and before
    this process's own `os._exit` calls) writes everything queued first."""

    def __init__(self, target: logging.Handler) -> None:
        queue: SimpleQueue[logging.LogRecord] = SimpleQueue()
        super().__init__(queue)
        self._listener: logging.handlers.QueueListener | None = logging.handlers.QueueListener(queue, target)
        self._listener.start()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message is merged here, while its arguments are as they were when logged; the
        # record itself goes on (the stdlib's prepare copies it and formats it twice).
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        return record

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()  # writes what is queued, then ends the writer thread
        super().close()


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Log to `stream` (stderr by default) through the handoff above."""
    writer = logging.StreamHandler(stream or sys.stderr)
    writer.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler = _Handoff(writer)
    handler.addFilter(CorrelationFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, _Handoff):
            old.close()  # a configuration before this one: its writer thread ends
    root.addHandler(handler)
    root.setLevel(level)
    # Alembic narrates every connection it inspects (the health check does that every few seconds).
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
