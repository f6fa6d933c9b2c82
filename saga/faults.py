"""Fault switches for tests: a JSON file (`--fault-file`) read at run time, off when absent.

Tests flip faults on a running process by rewriting the file, e.g.
`{"inventory_error": true}`, `{"inventory_delay_s": 3}` (before every inventory call),
`{"settle_delay_s": 5}` (the saga, between reserving and settling), `{"handler_delay_s": 5}` (after
a handler, before its outcome is recorded), `{"crash_after_reserve": true}`,
`{"crash_before_complete": true}`, `{"crash_on_sku": "SKU-1"}` (the saga of any order holding that
SKU kills the process, every time: a crash loop), and
`{"stall_probability": 0.2, "stall_s": 2}` (at every step boundary of the saga, with that
probability, stall for that long: past a short lease, another process takes the step over), and
`{"lease_renewal_off": true}` (the dispatcher renews no lease: a stall then stands for the whole
process stalling, as a pause of the machine or a lost database connection would).
The file is re-read when its modification time changes; without the setting nothing is read.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class _HasSku(Protocol):
    @property
    def sku(self) -> str: ...


class InjectedFaultError(Exception):
    """The error a fault switch raises in place of a real failure."""


class FaultSwitches:
    def __init__(self, path: str = "") -> None:
        self._path = Path(path) if path else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._values: dict[str, Any] = {}

    def get(self, name: str, default: Any = None) -> Any:
        if self._path is None:
            return default
        with self._lock:
            try:
                info = self._path.stat()
                stamp = (info.st_mtime_ns, info.st_size)
            except FileNotFoundError:
                self._values, self._stamp = {}, None
                return default
            if stamp != self._stamp:
                try:
                    loaded = json.loads(self._path.read_text() or "{}")
                except ValueError:
                    loaded = {}
                self._values = loaded if isinstance(loaded, dict) else {}
                self._stamp = stamp
            return self._values.get(name, default)

    def maybe_fail(self, name: str) -> None:
        if self.get(name):
            raise InjectedFaultError(f"injected fault {name}")

    def maybe_delay(self, name: str) -> None:
        delay = float(self.get(name, 0) or 0)
        if delay > 0:
            time.sleep(delay)

    def maybe_crash(self, name: str) -> None:
        """Kill this process at once, as SIGKILL would: no cleanup, no commit."""
        if self.get(name):
            log.warning("fault %s: killing the process", name)
            logging.shutdown()  # the log lines queued so far, this one included, are written
            os._exit(137)

    def maybe_crash_on(self, items: Iterable[_HasSku]) -> None:
        """Kill the process if an item's SKU is the switch `crash_on_sku`."""
        sku = self.get("crash_on_sku")
        if sku and any(item.sku == sku for item in items):
            self.maybe_crash("crash_on_sku")

    def maybe_stall(self, boundary: str) -> None:
        """At a step boundary of the saga, stall `stall_s` seconds with `stall_probability`."""
        chance = float(self.get("stall_probability", 0) or 0)
        if chance > 0 and random.random() < chance:
            seconds = float(self.get("stall_s", 0) or 0)
            log.warning("fault stall: %.1fs at %s", seconds, boundary)
            time.sleep(seconds)
