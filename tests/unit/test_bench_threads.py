"""bench/threads.py: counters summed by kind of thread, for the per-order table it prints."""

from __future__ import annotations

import os
import threading

from bench.threads import Task, kind, per_kind, tasks


def test_threads_of_one_kind_go_under_one_name() -> None:
    assert kind("grpc_3") == "grpc_N"
    assert kind("dispatcher-round_1") == "dispatcher-round_N"
    assert kind("Thread-3 (_serve)") == "Thread-3 (_serve)"
    assert kind("log-writer") == "log-writer"


def test_per_kind_sums_what_each_thread_did_between_the_readings() -> None:
    before = {"11": Task("orders-server", 10, 5, 100, 7), "12": Task("orders-server", 1, 1, 1, 1)}
    after = {
        "11": Task("orders-server", 14, 6, 130, 9),
        "12": Task("orders-server", 3, 2, 5, 1),
        "13": Task("orders-server", 2, 0, 4, 0),  # started between the readings: all of it counts
    }
    names = {"11": "grpc_0", "12": "grpc_1", "13": "saga_0"}
    assert per_kind(before, after, names) == {"grpc_N": [6, 2, 34, 2, 2], "saga_N": [2, 0, 4, 0, 1]}


def test_tasks_reads_this_process_threads_from_proc() -> None:
    started = threading.Event()
    done = threading.Event()

    def wait() -> None:
        started.set()
        done.wait()

    helper = threading.Thread(target=wait)
    helper.start()
    started.wait()
    try:
        found = tasks(os.getpid())
        assert str(threading.get_native_id()) in found
        assert str(helper.native_id) in found
        assert all(task.voluntary >= 0 and task.user >= 0 for task in found.values())
    finally:
        done.set()
        helper.join()
