"""A fixed set of threads running tasks from one queue: the saga's bulkhead and the round threads."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from functools import partial

log = logging.getLogger("orders.dispatcher")


class WorkerPool:
    """`workers` threads running tasks from one queue, in the order given; nothing comes back.

    What the dispatcher needs of an executor, and no more: `ThreadPoolExecutor.submit` builds a
    future, its condition and a work item for every task and wakes a thread through a semaphore,
    which the dispatcher never reads, all on the dispatcher's own thread (docs/performance.md has
    the profile). Here a task is one put on a `queue.SimpleQueue`.
    """

    def __init__(self, workers: int, name: str, on_start: Callable[[], None] | None = None) -> None:
        """`on_start`: run first in each thread (the dispatcher marks its threads' writes, see
        `db.engine.background_writer`)."""
        self._on_start = on_start
        self._tasks: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{n}", daemon=True) for n in range(workers)
        ]
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    def start(self) -> None:
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
        for thread in self._threads:
            thread.start()

    def submit(self, task: Callable[..., object], *args: object) -> None:
        """Queue `task(*args)`; RuntimeError once the pool has shut down."""
        if self._closed:
            raise RuntimeError("the worker pool has shut down")
        self._tasks.put(partial(task, *args))

    def shutdown(self, wait: bool) -> None:
        """Drop the tasks not yet started and end the threads once their running tasks return
        (waited for when `wait`)."""
        with self._lock:
            self._closed = True
            started = self._started
        while True:
            try:
                self._tasks.get_nowait()
            except queue.Empty:
                break
        if not started:
            return
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while (task := self._tasks.get()) is not None:
            if self._closed:
                continue  # taken from the queue before the shutdown could drop it
            try:
                task()
            except Exception:  # a task's own errors are its business; the thread goes on
                log.exception("a task of the worker pool failed")
