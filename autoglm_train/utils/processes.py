"""The process tree under a process, read from /proc (Linux; elsewhere nothing is found): what a rank must end
before it exits, so that no loader worker or ``pipe:`` command outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
from collections import defaultdict
from pathlib import Path


def children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, the last ")" ends it
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children[ppid].append(int(stat.parent.name))
    return children


def descendants(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """Every process under ``pid`` (children, their children, ...), parents before their children."""
    children = children_by_parent() if children is None else children
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the pid, names one process even after the pid
    is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def snapshot_descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of the processes under ``pid`` now: a process orphaned later (its parent killed)
    leaves the tree but stays in the snapshot, and ``kill_processes`` ends it only if it is the same one."""
    found = {}
    for child in descendants(pid):
        started = start_time(child)
        if started is not None:
            found[child] = started
    return found


def kill_processes(processes: dict[int, int | None], signum: int = signal.SIGKILL) -> None:
    """Signal each pid whose start time is still the one given (None: any); gone ones are skipped."""
    for pid, started in processes.items():
        if pid == os.getpid() or (started is not None and start_time(pid) != started):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
