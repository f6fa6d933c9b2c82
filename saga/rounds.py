"""When the dispatcher claims: the rules of its rounds, as pure functions of what it holds.

A round is one transaction (one statement on PostgreSQL): the DONE marks of finished events and a
claim of due ones. The rules, each measured (docs/performance.md has the figures):

- claim only while a worker is idle, and then `workers` events at least and at most one batch
  ahead of the workers (`2 * workers` held): events claimed for workers that are all busy wait in
  this process's queue, and for workers stuck on slow handlers they would wait out their leases;
  topping the queue up as each handler finished made a claim statement per event or two. A batch
  of events run together (saga.dispatcher) takes one worker and counts every event it holds;
- while rounds come back full (a backlog), `ROUNDS` rounds at once and up to `4 * workers` events
  held: one round's statement is in the database while the other's events go to the workers;
- in a backlog whose handlers get through what is claimed (`SETTLED` batches' worth done in a
  row, none deferred, retried or fenced since), a round claims `BACKLOG_CLAIM` batches' worth and
  up to `ROUNDS * BACKLOG_CLAIM * workers` are held: a round costs about the same whatever it
  claims. Not while handlers defer: each instance with a rate limiter of its own would then claim
  most of a backlog it can only defer and leave other instances idle;
- after a failed round, one at a time again, of the usual size, after a pause that doubles with
  each failure;
- woken with no worker free, a round cannot claim: a claim is owed, and the next finished handler
  brings the dispatcher back (or finished events are marked DONE on their own, `flush_due`).
"""

from __future__ import annotations

from dataclasses import dataclass

# Rounds in flight at once while rounds come back full.
ROUNDS = 2
# What one round claims in a backlog its handlers get through, in workers' worth (two otherwise);
# measured in docs/performance.md ("Ninth round" and "Tenth round").
BACKLOG_CLAIM = 4
# Events done in a row, in workers' worth, before rounds claim `BACKLOG_CLAIM` batches' worth.
SETTLED = 2


@dataclass(frozen=True)
class Load:
    """What the dispatcher holds when it decides (read under its lock)."""

    workers: int
    busy: int  # workers taken: events running or queued (a batch takes one), and hand-offs promised
    claiming: int  # events the rounds in flight may still claim
    rounds: int  # rounds in flight
    wanted: int  # rounds asked for (a wake-up, a full round, completed events)
    full: bool  # the last round claimed all it asked for: more may be due
    failing: bool  # the last round failed
    finished: int  # handled events waiting for their DONE
    in_flight: int  # events running or queued
    held: int  # events held: running or queued (each of a batch), and hand-offs promised
    settled: int = 0  # events done in a row: none deferred, retried, fenced or expired since


@dataclass(frozen=True)
class Plan:
    """The rounds to start, each the number of events it may claim (0: DONE marks only), the
    rounds still wanted after them, and whether a claim is owed (no worker was free to claim for)."""

    sizes: tuple[int, ...]
    wanted: int
    owe_claim: bool


def plan_rounds(load: Load) -> Plan:
    sizes: list[int] = []
    wanted, rounds, claiming = load.wanted, load.rounds, load.claiming
    limit = 1 if load.failing else ROUNDS
    settled = load.settled >= SETTLED * load.workers
    claim = (BACKLOG_CLAIM if load.full and settled and not load.failing else 2) * load.workers
    most_held = ROUNDS * claim if load.full else claim
    owe_claim = False
    while wanted > 0 and rounds < limit:
        room = most_held - load.held - claiming
        if room < load.workers or load.busy >= load.workers:
            if rounds == 0:
                owe_claim, wanted = True, 0
                if flush_due(load.finished, load.workers, load.in_flight):
                    sizes.append(0)
            break
        size = min(room, claim)
        sizes.append(size)
        wanted, rounds, claiming = wanted - 1, rounds + 1, claiming + size
    return Plan(tuple(sizes), wanted, owe_claim)


def flush_due(finished: int, workers: int, in_flight: int) -> bool:
    """Mark finished events DONE now, without a claim: two batches' worth have gathered, or
    nothing is left running whose end would bring a round."""
    return finished >= 2 * workers or (finished > 0 and in_flight == 0)


def wanted_after_round(size: int, claimed: int, completed: int, wanted: int, rounds_left: int) -> int:
    """Rounds wanted once a round of `size` claimed `claimed` and completed `completed` (other
    rounds still in flight: `rounds_left`). A full round: more may be due, run `ROUNDS` at once.
    Completed events: their orders' later events were not claimable in that same statement."""
    if claimed and claimed == size:
        return max(wanted, ROUNDS - rounds_left)
    if completed:
        return max(wanted, 1)
    return wanted


def pause_after_failures(failures: int, poll_interval_s: float) -> float:
    """Seconds before the next round after `failures` failed rounds in a row: doubling from the
    poll interval, capped at five polls (five seconds at least)."""
    cap = max(5 * poll_interval_s, 5.0)
    return min(poll_interval_s * 2.0**failures, cap)
