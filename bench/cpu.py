"""CPU used during a scenario, in cores: the server process, PostgreSQL's processes, the machine.

Read from /proc (Linux only): the server's utime + stime, the same summed over every process
named `postgres`, and the machine's busy share of /proc/stat. A window that starts after the
scenario's warm-up keeps the connects and the warm-up out of it. On a machine without /proc the
sample is empty and the report leaves the figures out.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

_PROC = Path("/proc")


def _ticks(pid: str) -> int | None:
    try:
        fields = (_PROC / pid / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def _snapshot(server_pid: int) -> tuple[float, int, int, list[int]]:
    server = _ticks(str(server_pid)) or 0
    postgres = 0
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        postgres += _ticks(entry.name) or 0
    machine = [int(x) for x in (_PROC / "stat").read_text().splitlines()[0].split()[1:]]
    return time.monotonic(), server, postgres, machine


class CpuWindow:
    """A `with` block that samples once `start_after_s` has passed and again `seconds` later; on
    leaving, it waits for the second sample. `result()` after the block (empty without /proc)."""

    def __init__(self, server_pid: int, start_after_s: float, seconds: float) -> None:
        self._pid = server_pid
        self._start_after_s = start_after_s
        self._seconds = seconds
        self._out: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="cpu-window", daemon=True)

    def __enter__(self) -> CpuWindow:
        if (_PROC / "stat").exists():
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._thread.ident is not None:  # started
            self._thread.join()

    def _run(self) -> None:
        time.sleep(self._start_after_s)
        began, server, postgres, machine = _snapshot(self._pid)
        time.sleep(self._seconds)
        ended, server2, postgres2, machine2 = _snapshot(self._pid)
        hz = os.sysconf("SC_CLK_TCK")
        wall = ended - began
        spent = [b - a for a, b in zip(machine, machine2, strict=True)]
        idle = spent[3] + (spent[4] if len(spent) > 4 else 0)  # idle + iowait
        self._out = {
            "server_cores": round((server2 - server) / hz / wall, 2),
            "postgresql_cores": round((postgres2 - postgres) / hz / wall, 2),
            "machine_busy_cores": round((1 - idle / max(sum(spent), 1)) * (os.cpu_count() or 1), 2),
            "seconds": round(wall, 1),
        }

    def result(self) -> dict[str, Any]:
        return dict(self._out)
