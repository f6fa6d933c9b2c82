"""Log set-up: every line carries the correlation id (and order id) of the work that caused it.

The stamping filter sits on the handler, not on a logger, so records propagated from any logger,
in any thread, get the fields; records outside any call get "-".
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = (
    "%(asctime)s %(levelname)-7s [%(threadName)s] %(name)s "
    "correlation_id=%(correlation_id)s order_id=%(order_id)s %(message)s"
)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CorrelationFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Alembic narrates every connection it inspects (the health check does that every few seconds).
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
