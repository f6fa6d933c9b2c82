"""Fault injection for tests, installed by the composition root as wrappers: nothing in `saga/`
knows of it. Off unless the process runs with `ORDERS_TESTING_FAULTS=1` and `--fault-file`
(server.config refuses the file otherwise): no production user is offered a switch that kills
the process.

The file is JSON, re-read when it changes, so a test flips faults on a running process, e.g.
`{"inventory_error": true}`, `{"inventory_delay_s": 3}` (before every inventory call),
`{"settle_delay_s": 5}` (after a reservation, before the order is settled), `{"handler_delay_s": 5}`
(after a handler, before its outcome is recorded), `{"crash_after_reserve": true}`,
`{"crash_before_complete": true}`, `{"crash_on_sku": "SKU-1"}` (the saga of any order holding that
SKU kills the process, every time: a crash loop),
`{"stall_probability": 0.2, "stall_s": 2}` (around every inventory call of the saga, at the step
boundaries before_reserve, after_reserve, before_release and after_release, with that
probability, stall for that long: past a short lease, another process takes the step over), and
`{"lease_renewal_off": true}` (the dispatcher renews no lease: a stall then stands for the whole
process stalling, as a pause of the machine or a lost database connection would).

- `FaultyParticipant` wraps the inventory participant (inside the guard, so injected errors and
  delays are what the breaker sees);
- `faulty_handlers` and `faulty_batch_handlers` wrap the dispatcher's handlers (after a handler,
  before its outcome);
- `FaultSwitches.renewal_paused` is the dispatcher's `renewal_paused`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from db.outbox import ClaimedEvent
from domain import correlation
from domain.allocation import ReservationRequest
from domain.fencing import Fence
from domain.inventory import ReservationOutcome, Superseded
from domain.model import OrderItem
from saga.inventory import InventoryParticipant
from saga.verdicts import BatchHandler, Handler, Verdict

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

    def renewal_paused(self) -> bool:
        return bool(self.get("lease_renewal_off"))


class FaultyParticipant:
    """The inventory participant with the fault switches around its calls (see the module)."""

    def __init__(self, inner: InventoryParticipant, faults: FaultSwitches) -> None:
        self._inner = inner
        self._faults = faults

    @property
    def conflict_retries(self) -> int:
        return self._inner.conflict_retries

    def _inventory(self) -> None:
        self._faults.maybe_delay("inventory_delay_s")
        self._faults.maybe_fail("inventory_error")

    def reserve(
        self, order_id: str, items: tuple[OrderItem, ...], fence: Fence | None = None
    ) -> ReservationOutcome:
        self._faults.maybe_crash_on(items)
        self._faults.maybe_stall("before_reserve")
        self._inventory()
        outcome = self._inner.reserve(order_id, items, fence)
        self._faults.maybe_crash("crash_after_reserve")
        self._faults.maybe_delay("settle_delay_s")
        self._faults.maybe_stall("after_reserve")
        return outcome

    def reserve_many(self, requests: Sequence[ReservationRequest]) -> dict[str, ReservationOutcome]:
        """The same switches around a batch's one reservation; a crash names an order of the
        batch in its log line (the one holding the SKU, for `crash_on_sku`)."""
        for request in requests:
            with correlation.bound(correlation.current(), request.order_id):
                self._faults.maybe_crash_on(request.items)
        with correlation.bound(correlation.current(), requests[0].order_id if requests else None):
            self._faults.maybe_stall("before_reserve")
            self._inventory()
            outcomes = self._inner.reserve_many(requests)
            self._faults.maybe_crash("crash_after_reserve")
            self._faults.maybe_delay("settle_delay_s")
            self._faults.maybe_stall("after_reserve")
        return outcomes

    def release(
        self, order_id: str, items: tuple[OrderItem, ...] = (), fence: Fence | None = None, reason: str = ""
    ) -> list[OrderItem] | Superseded:
        self._faults.maybe_stall("before_release")
        self._inventory()
        released = self._inner.release(order_id, items, fence, reason)
        self._faults.maybe_stall("after_release")
        return released


def faulty_handlers(handlers: Mapping[str, Handler], faults: FaultSwitches) -> dict[str, Handler]:
    """Each handler, then `handler_delay_s` and `crash_before_complete` before its outcome is recorded."""

    def wrap(handler: Handler) -> Handler:
        def run(event: ClaimedEvent) -> Verdict:
            verdict = handler(event)
            faults.maybe_delay("handler_delay_s")
            faults.maybe_crash("crash_before_complete")
            return verdict

        return run

    return {event_type: wrap(handler) for event_type, handler in handlers.items()}


def faulty_batch_handlers(
    handlers: Mapping[str, BatchHandler], faults: FaultSwitches
) -> dict[str, BatchHandler]:
    """`faulty_handlers` for batch handlers: the switches once after a batch, its crash line
    naming the batch's first order."""

    def wrap(handler: BatchHandler) -> BatchHandler:
        def run(events: Sequence[ClaimedEvent]) -> Mapping[int, Verdict]:
            verdicts = handler(events)
            with correlation.bound(correlation.current(), events[0].aggregate_id if events else None):
                faults.maybe_delay("handler_delay_s")
                faults.maybe_crash("crash_before_complete")
            return verdicts

        return run

    return {event_type: wrap(handler) for event_type, handler in handlers.items()}
