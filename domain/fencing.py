"""The fencing token of a saga step's lease, for participants that keep it beside their rows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fence:
    """The fencing token of a saga step: its outbox event and the number of the claim that leased
    it. Tokens of one order grow (later claims, later events of the order), so the inventory can
    refuse the writes of a step older than the newest that wrote (`StockRepository.fence`)."""

    event_id: int
    claim: int
