"""The dispatcher's round rules (saga.rounds), as a table: what it holds -> the rounds it starts."""

from __future__ import annotations

import pytest

from saga.rounds import (
    BACKLOG_CLAIM,
    ROUNDS,
    SETTLED,
    Load,
    Plan,
    flush_due,
    pause_after_failures,
    plan_rounds,
    wanted_after_round,
)

W = 4  # workers


def load(**changes: object) -> Load:
    base: dict[str, object] = {
        "workers": W,
        "busy": 0,
        "claiming": 0,
        "rounds": 0,
        "wanted": 1,
        "full": False,
        "failing": False,
        "finished": 0,
        "in_flight": 0,
    }
    base.update(changes)
    base.setdefault("held", base["busy"])  # no batch: every event held takes a worker
    return Load(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("situation", "held", "plan"),
    [
        ("idle, woken once: one round of two batches", load(), Plan((2 * W,), 0, False)),
        ("nothing wanted: no round", load(wanted=0), Plan((), 0, False)),
        ("one worker busy: the room left", load(busy=1, in_flight=1), Plan((2 * W - 1,), 0, False)),
        (
            "a backlog (last round full) and two wanted: two rounds, four batches held at most",
            load(wanted=2, full=True),
            Plan((2 * W, 2 * W), 0, False),
        ),
        (
            "a backlog whose handlers get through it (settled): two rounds of BACKLOG_CLAIM batches",
            load(wanted=2, full=True, settled=SETTLED * W),
            Plan((BACKLOG_CLAIM * W, BACKLOG_CLAIM * W), 0, False),
        ),
        (
            "settled, half of the most held already held: the room left",
            load(wanted=2, full=True, settled=SETTLED * W, busy=1, held=BACKLOG_CLAIM * W),
            Plan((BACKLOG_CLAIM * W,), 1, False),
        ),
        (
            "one short of settled: the usual size",
            load(wanted=2, full=True, settled=SETTLED * W - 1),
            Plan((2 * W, 2 * W), 0, False),
        ),
        ("settled but not a backlog: the usual size", load(settled=SETTLED * W), Plan((2 * W,), 0, False)),
        (
            "settled, after a failure: one round of the usual size",
            load(wanted=2, full=True, failing=True, settled=SETTLED * W),
            Plan((2 * W,), 1, False),
        ),
        (
            "a round already in flight: only one more",
            load(wanted=2, rounds=1, claiming=W),
            Plan((W,), 1, False),
        ),
        ("every worker busy: a claim is owed, no round", load(busy=W, in_flight=W), Plan((), 0, True)),
        (
            "every worker busy and two batches finished: DONE marks alone",
            load(busy=W, in_flight=W, finished=2 * W),
            Plan((0,), 0, True),
        ),
        (
            "less room than a batch: wait (a round in flight decides)",
            load(busy=W - 1, in_flight=W - 1, rounds=1, claiming=W),
            Plan((), 1, False),
        ),
        (
            "after a failure: one round at a time",
            load(wanted=2, full=True, failing=True),
            Plan((2 * W,), 1, False),
        ),
        ("failing with one in flight: none", load(wanted=1, rounds=1, failing=True), Plan((), 1, False)),
        (
            "a batch of two batches' worth on one worker: workers idle, but no room (a claim is owed)",
            load(busy=1, held=2 * W, in_flight=2 * W),
            Plan((), 0, True),
        ),
        (
            "a batch of one batch's worth on one worker, in a backlog: one more round",
            load(busy=1, held=W, in_flight=W, full=True),
            Plan((2 * W,), 0, False),
        ),
    ],
)
def test_the_rounds_started_for_what_the_dispatcher_holds(situation: str, held: Load, plan: Plan) -> None:
    assert plan_rounds(held) == plan, situation


@pytest.mark.parametrize(
    ("finished", "in_flight", "due"),
    [(0, 0, False), (1, 0, True), (1, 1, False), (2 * W - 1, 3, False), (2 * W, 3, True)],
)
def test_finished_events_are_marked_done_alone_when_two_batches_wait_or_nothing_runs(
    finished: int, in_flight: int, due: bool
) -> None:
    assert flush_due(finished, W, in_flight) is due


@pytest.mark.parametrize(
    ("size", "claimed", "completed", "wanted", "left", "after"),
    [
        (8, 8, 0, 0, 0, ROUNDS),  # full: more may be due, run rounds at once
        (8, 8, 0, 0, 1, ROUNDS - 1),  # the other round is still in flight
        (8, 3, 0, 0, 0, 0),  # not full, nothing completed: nothing more to look for
        (8, 3, 2, 0, 0, 1),  # completed events: their orders' next events may now be claimable
        (0, 0, 5, 0, 0, 1),  # a DONE-only round
        (8, 0, 0, 1, 0, 1),  # already wanted stays wanted
    ],
)
def test_the_rounds_wanted_after_a_round(
    size: int, claimed: int, completed: int, wanted: int, left: int, after: int
) -> None:
    assert wanted_after_round(size, claimed, completed, wanted, left) == after


@pytest.mark.parametrize(
    ("failures", "poll", "pause"),
    [(1, 1.0, 2.0), (2, 1.0, 4.0), (3, 1.0, 5.0), (10, 1.0, 5.0), (1, 0.05, 0.1), (10, 2.0, 10.0)],
)
def test_the_pause_after_failed_rounds_doubles_up_to_five_polls(
    failures: int, poll: float, pause: float
) -> None:
    assert pause_after_failures(failures, poll) == pytest.approx(pause)
