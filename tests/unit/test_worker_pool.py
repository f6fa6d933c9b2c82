"""The dispatcher's worker pool: tasks run in the order given, a failing task does not end its
thread, and a shutdown drops what has not started and refuses what comes after."""

from __future__ import annotations

import threading

import pytest

from saga.worker_pool import WorkerPool
from tests.support import wait_until


def test_tasks_run_in_the_order_given() -> None:
    pool = WorkerPool(1, "test")
    pool.start()
    ran: list[int] = []
    for n in range(50):
        pool.submit(ran.append, n)
    wait_until(lambda: len(ran) == 50, what="fifty tasks")
    pool.shutdown(wait=True)
    assert ran == list(range(50))


def test_a_failing_task_leaves_its_thread_running() -> None:
    pool = WorkerPool(1, "test")
    pool.start()
    ran: list[str] = []

    def fail() -> None:
        raise ValueError("boom")

    pool.submit(fail)
    pool.submit(ran.append, "after")
    wait_until(lambda: ran == ["after"], what="the task after the failing one")
    pool.shutdown(wait=True)


def test_shutdown_drops_queued_tasks_and_refuses_new_ones() -> None:
    pool = WorkerPool(1, "test")
    pool.start()
    gate, started = threading.Event(), threading.Event()
    ran: list[str] = []
    late: list[str] = []

    def block() -> None:
        started.set()
        gate.wait(10)

    pool.submit(block)
    started.wait(10)
    pool.submit(ran.append, "queued")
    stopper = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
    stopper.start()
    wait_until(lambda: _refuses(pool, late), what="the pool to refuse new tasks")
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert ran == [], "a task queued before the shutdown must not run"
    assert late == []


def test_a_pool_never_started_shuts_down_at_once() -> None:
    pool = WorkerPool(4, "test")
    pool.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        pool.submit(print, "never")


def _refuses(pool: WorkerPool, late: list[str]) -> bool:
    try:
        pool.submit(late.append, "late")  # queued before the shutdown, it is dropped with the rest
    except RuntimeError:
        return True
    return False
