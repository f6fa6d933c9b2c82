"""Log set-up: every line carries the correlation id (and order id) of the work that caused it, and
with tracing on (server.tracing) its trace id too.

The stamping filter sits on the handler, not on a logger, so records propagated from any logger,
in any thread, get the fields; records outside any call get "-".
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

from domain import correlation


class CorrelationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = correlation.current() or "-"
        record.order_id = correlation.current_order_id() or "-"
        return True


class TracingFilter(CorrelationFilter):
    """With tracing on: the trace and span ids of the span in hand too ("-" outside any)."""

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        trace = correlation.current_trace()
        record.trace_id, record.span_id = (trace.trace_id, trace.span_id) if trace else ("-", "-")
        return True


class _SecondStamp:
    """The part of a timestamp down to the second, made once per second: one writer thread formats
    every line, and `strftime` per line dominated its work under load (docs/performance.md)."""

    def __init__(self, make: Callable[[int], str]) -> None:
        self._make = make
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, self._make(second)
        return self._text


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT` (or `fmt`), with the stdlib's time format (local time, `2026-12-06 22:07:57,123`)."""

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt or TEXT_FORMAT)
        self._stamp = _SecondStamp(self._local_second)

    def _local_second(self, second: int) -> str:
        return time.strftime(self.default_time_format, self.converter(second))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._stamp(record.created)},{int(record.msecs):03d}"


def _utc_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    def __init__(self, trace_ids: bool = False) -> None:
        super().__init__()
        self._stamp = _SecondStamp(_utc_second)
        self._trace_ids = trace_ids  # TracingFilter's fields, with tracing on

    def format(self, record: logging.LogRecord) -> str:
        micros = int((record.created - int(record.created)) * 1_000_000)
        entry = {
            "time": f"{self._stamp(record.created)}.{micros:06d}+00:00",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", "-"),
            "order_id": getattr(record, "order_id", "-"),
            "thread": record.threadName,
        }
        if self._trace_ids:
            entry["trace_id"] = getattr(record, "trace_id", "-")
            entry["span_id"] = getattr(record, "span_id", "-")
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
# With tracing on (TracingFilter): the trace id after the order id.
TRACED_TEXT_FORMAT = TEXT_FORMAT.replace(" %(message)s", " trace_id=%(trace_id)s %(message)s")


class _Handoff(logging.handlers.QueueHandler):
    """The root handler: the calling thread stamps the record (filters run there, so the context
    variables and the thread name are the caller's) and queues it; one writer thread formats and
    writes. With the stream handler at the root, some thirty threads (gRPC handlers, saga workers)
    took turns on its lock for every line, a saga step two or three times, and each turn was
    another wait for the GIL (docs/performance.md).

    The writer takes what has queued up since its last turn, writes it in one `write` and flushes
    once, then pauses for `_GATHER_S` before its next turn unless the queue was empty: a line
    queued while the writer is not waiting on the queue wakes no thread, where waking the writer
    for each line cost the logging thread a switch of the GIL per call. A line is in the queue,
    not yet written, for as long as the writer takes to get to it (a few milliseconds); a process
    killed outright loses what is queued. `close` (`logging.shutdown`: at exit, and before this
    process's own `os._exit` calls) writes everything queued first."""

    _STOP = None
    _MOST_PER_WRITE = 512
    _GATHER_S = 0.005

    def __init__(self, target: logging.StreamHandler[TextIO]) -> None:
        self._records: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        super().__init__(self._records)
        self._target = target
        writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
        writer.start()
        self._writer: threading.Thread | None = writer

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message is merged here, while its arguments are as they were when logged; the
        # record itself goes on (the stdlib's prepare copies it and formats it twice).
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        return record

    def _write(self) -> None:
        records, target = self._records, self._target
        stopping = False
        while not stopping:
            batch = [records.get()]
            while len(batch) < self._MOST_PER_WRITE:
                try:
                    batch.append(records.get_nowait())
                except queue.Empty:
                    break
            lines = []
            for record in batch:
                if record is self._STOP:
                    stopping = True
                    continue
                try:
                    lines.append(target.format(record) + target.terminator)
                except Exception:
                    target.handleError(record)
            if lines:
                try:
                    target.stream.write("".join(lines))
                    target.flush()
                except Exception:
                    target.handleError(batch[-1] or logging.makeLogRecord({}))
            if len(batch) > 1 and not stopping:
                time.sleep(self._GATHER_S)  # busy: let lines gather without waking this thread

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            self._records.put(self._STOP)
            writer.join()  # writes what is queued, then the writer thread ends
        super().close()


def configure(
    level: str = "INFO", fmt: str = "text", stream: TextIO | None = None, trace_ids: bool = False
) -> None:
    """Log to `stream` (stderr by default) through the handoff above; with `trace_ids` (tracing on)
    every line carries the trace id too."""
    writer = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        writer.setFormatter(JsonFormatter(trace_ids))
    else:
        writer.setFormatter(TextFormatter(TRACED_TEXT_FORMAT if trace_ids else None))
    handler = _Handoff(writer)
    handler.addFilter(TracingFilter() if trace_ids else CorrelationFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, _Handoff):
            old.close()  # a configuration before this one: its writer thread ends
    root.addHandler(handler)
    root.setLevel(level)
    # Alembic narrates every connection it inspects (the health check does that every few seconds).
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
