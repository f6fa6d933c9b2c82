"""`free_ports`: a run of consecutive ports for a supervisor whose process i takes the metrics port + i."""

from __future__ import annotations

import itertools
import socket

import pytest

from tests import local_services
from tests.local_services import free_ports


def test_every_port_of_the_run_can_be_bound() -> None:
    first = free_ports(4)

    held = []
    try:
        for port in range(first, first + 4):
            probe = socket.socket()
            held.append(probe)
            probe.bind(("127.0.0.1", port))
    finally:
        for probe in held:
            probe.close()


def test_a_first_port_whose_neighbour_is_held_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        # After the planted port, real ones: the neighbour of any of those may be held too, by a
        # connection of another test, so free_ports may ask more than once.
        real_free_port = local_services.free_port
        offered = itertools.chain([busy - 1], iter(real_free_port, None))
        monkeypatch.setattr(local_services, "free_port", lambda: next(offered))

        first = free_ports(2)

        assert first != busy - 1, "the run would have covered the held port"
    finally:
        held.close()
