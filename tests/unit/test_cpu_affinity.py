"""`--cpu-affinity`: which CPU each process of a server takes, and when the guard lets it go
(server/affinity.py). The pinning itself, on real processes: tests/e2e/test_cpu_affinity.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from server import affinity
from server.affinity import AffinityError, AffinityGuard, Reading


@pytest.mark.parametrize(
    ("value", "cpus"),
    [("0", {0}), ("3", {3}), ("0,2-3", {0, 2, 3}), ("1-1", {1}), (" 0, 5 ", {0, 5}), ("2-4,3", {2, 3, 4})],
)
def test_a_cpu_list_names_single_cpus_and_ranges(value: str, cpus: set[int]) -> None:
    assert affinity.parse_cpus(value) == cpus


@pytest.mark.parametrize("value", ["", "x", "-1", "1-", "3-1", "1,,2", "1;2", "0x1"])
def test_anything_else_is_refused(value: str) -> None:
    with pytest.raises(AffinityError):
        affinity.parse_cpus(value)


def test_check_names_a_cpu_the_process_may_not_use() -> None:
    assert affinity.check("auto", frozenset({0, 1})) == []
    assert affinity.check("none", frozenset({0, 1})) == []
    assert affinity.check("1", frozenset({0, 1})) == []
    [problem] = affinity.check("0-2", frozenset({0, 1}))
    assert "CPU 2" in problem and "0-1" in problem


def test_auto_gives_each_process_of_a_server_its_own_cpu_from_the_last() -> None:
    allowed = frozenset({0, 1, 2, 3})
    chosen = [affinity.choose("auto", allowed, index) for index in range(5)]
    assert chosen == [frozenset({cpu}) for cpu in (3, 2, 1, 0, 3)]  # round the set again past its size
    assert affinity.choose("auto", frozenset({4, 6}), 0) == frozenset({6})


def test_auto_on_one_cpu_and_none_leave_the_process_as_it_is() -> None:
    assert affinity.choose("auto", frozenset({2}), 0) is None
    assert affinity.choose("none", frozenset({0, 1}), 0) is None


def test_an_explicit_list_is_the_same_for_every_process() -> None:
    assert affinity.choose("0-1", frozenset({0, 1, 2}), 0) == affinity.choose("0-1", frozenset({0, 1, 2}), 2)


def test_describe_folds_runs() -> None:
    assert affinity.describe({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert affinity.describe({3}) == "3"


def reading(busy: int, total: int, own: int) -> Reading:
    return Reading(cpu_busy=busy, cpu_total=total, own=own)


def test_crowded_when_the_cpu_is_busy_mostly_with_other_work() -> None:
    start = reading(0, 0, 0)
    assert affinity.crowded(start, reading(500, 500, 100))  # busy all along, a fifth of it ours
    assert not affinity.crowded(start, reading(500, 500, 400))  # busy, mostly ours
    assert not affinity.crowded(start, reading(300, 500, 0))  # not busy enough to crowd anyone
    assert not affinity.crowded(start, reading(0, 0, 0))  # no time passed


def test_reading_the_cpu_and_the_process_from_proc_files(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 10 100 5 0 0 0 0 0\ncpu0 4 0 6 50 2 0 0 0\ncpu1 6 0 4 50 3 1 0 0\n")
    own = tmp_path / "self"
    own.write_text("42 (orders server) S 1 1 1 0 -1 0 0 0 0 0 7 3 0 0 20 0 30 0\n")
    assert affinity.read(1, stat, own) == Reading(cpu_busy=11, cpu_total=64, own=10)
    assert affinity.read(2, stat, own) is None  # a CPU /proc does not list


class Readings:
    """A guard's reader that serves prepared readings, then the last one again."""

    def __init__(self, *readings: Reading) -> None:
        self._left = list(readings)
        self.taken = threading.Event()

    def __call__(self, _cpu: int) -> Reading:
        if len(self._left) > 1:
            return self._left.pop(0)
        self.taken.set()
        return self._left[0]


def guard(reader: Readings, widened: list[frozenset[int]]) -> AffinityGuard:
    return AffinityGuard(
        1, frozenset({0, 1}), interval_s=0.001, windows=2, reader=reader, widen=widened.append
    )


def test_the_guard_lets_go_after_two_crowded_windows_in_a_row() -> None:
    widened: list[frozenset[int]] = []
    # start() reads once to see that the CPU is readable; _run reads a baseline, then windows.
    reader = Readings(
        reading(0, 0, 0),
        reading(0, 0, 0),
        reading(100, 100, 10),
        reading(200, 200, 20),
        reading(200, 200, 20),
    )
    watch = guard(reader, widened)
    watch.start()
    assert watch.widened.wait(5)
    assert widened == [frozenset({0, 1})]


def test_one_crowded_window_between_quiet_ones_does_not_let_go() -> None:
    widened: list[frozenset[int]] = []
    reader = Readings(
        reading(0, 0, 0),
        reading(0, 0, 0),
        reading(100, 100, 10),  # crowded
        reading(150, 200, 60),  # quiet: half busy
        reading(250, 300, 70),  # crowded again, but only once in a row
        reading(300, 400, 120),  # quiet, and stays so
    )
    watch = guard(reader, widened)
    watch.start()
    assert reader.taken.wait(5)
    watch.stop()
    assert widened == []
    assert not watch.widened.is_set()


@pytest.mark.skipif(not affinity.can_pin(), reason="this platform cannot pin")
def test_every_thread_of_the_process_gets_the_cpus_set_for_every_thread() -> None:
    """Threads keep their own affinity: a thread started before the change gets it too."""
    everywhere = affinity.allowed_cpus()
    ready, done = threading.Event(), threading.Event()

    def wait() -> None:
        ready.set()
        done.wait()

    helper = threading.Thread(target=wait)
    helper.start()
    ready.wait()
    one = frozenset({min(everywhere)})
    try:
        affinity.set_for_every_thread(one)
        assert os.sched_getaffinity(helper.native_id or 0) == one
        assert os.sched_getaffinity(0) == one
    finally:
        affinity.set_for_every_thread(everywhere)
        done.set()
        helper.join()
    assert os.sched_getaffinity(0) == everywhere
