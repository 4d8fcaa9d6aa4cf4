"""Where a benchmark's CPU went: a server's event-loop thread, its other threads, and the whole machine (Linux).

Contract: :func:`cpu_snapshot` ``(pid)`` -> a :class:`CpuSnapshot` (a process's CPU seconds, split into its main
thread and all its other threads, and the machine's busy and total CPU seconds over all cores), or None where
``/proc`` cannot be read (not Linux, or the process is gone); :func:`cpu_shares` ``(before, after)`` -> the
shares of the window between two snapshots, in cores: ``main_cores`` (for ``raml serve``: the event loop, which
runs on the main thread), ``other_cores`` (the batch worker, torch's threads, decoding threads) and
``machine_busy_cores`` (every process, the kernel's work included), with ``machine_cores``. Two snapshots of a
server process taken around a benchmark row say whether the event loop, the forward pass or the machine as a whole
was the limit: a loop well under a core on a machine whose every core is busy is waiting for a core, not working.

The figures are the kernel's: ``utime + stime`` of ``/proc/PID/task/TID/stat`` (clock ticks) and the ``cpu`` line
of ``/proc/stat`` (busy: user, nice, system, irq, softirq, steal; total: those and idle, iowait).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CORE_COLUMNS",
    "CpuSnapshot",
    "add_server_cores",
    "core_columns",
    "cpu_shares",
    "cpu_snapshot",
    "machine_seconds",
    "thread_seconds",
]

_PROC = Path("/proc")


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds at one moment (:func:`cpu_snapshot`)."""

    wall_s: float  # time.monotonic()
    main_s: float  # the process's main thread
    other_s: float  # its other threads, those alive at the moment
    machine_busy_s: float  # all cores together
    machine_total_s: float
    cores: int  # cores counted in /proc/stat's "cpu" line


def thread_seconds(stat_line: str, ticks_per_s: float) -> float:
    """``utime + stime`` in seconds from one ``/proc/.../stat`` line.

    The command name (field 2) is in parentheses and may itself hold spaces and parentheses: the fields are
    counted after its *last* closing parenthesis (utime and stime are fields 14 and 15).
    """
    fields = stat_line[stat_line.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def machine_seconds(proc_stat: str, ticks_per_s: float) -> tuple[float, float, int]:
    """(busy seconds, total seconds, cores) of all cores from the text of ``/proc/stat``."""
    cores = 0
    totals: list[int] | None = None
    for line in proc_stat.splitlines():
        name, _, rest = line.partition(" ")
        if name == "cpu":
            totals = [int(v) for v in rest.split()]
        elif name.startswith("cpu") and name[3:].isdigit():
            cores += 1
    if totals is None:
        raise ValueError("/proc/stat has no 'cpu' line.")
    user, nice, system, idle, iowait, irq, softirq, steal = (totals + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / ticks_per_s, (busy + idle + iowait) / ticks_per_s, cores


def cpu_snapshot(pid: int, proc: Path = _PROC) -> CpuSnapshot | None:
    """The CPU seconds of process ``pid`` (its main thread, its other threads) and of the machine; None where
    ``proc`` cannot be read."""
    ticks = float(os.sysconf("SC_CLK_TCK"))
    try:
        busy, total, cores = machine_seconds((proc / "stat").read_text(), ticks)
        tasks = list((proc / str(pid) / "task").iterdir())
    except (OSError, ValueError):
        return None
    main = other = 0.0
    for task in tasks:
        try:
            seconds = thread_seconds((task / "stat").read_text(), ticks)
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended in between
        if task.name == str(pid):
            main = seconds
        else:
            other += seconds
    return CpuSnapshot(time.monotonic(), main, other, busy, total, cores)


def cpu_shares(before: CpuSnapshot | None, after: CpuSnapshot | None) -> dict[str, float | None]:
    """The window's CPU in cores: ``main_cores``, ``other_cores``, ``machine_busy_cores`` and ``machine_cores``
    (None each where a snapshot is missing or the window is empty).

    A thread that ended within the window takes its seconds with it, so ``other_cores`` is a lower bound.
    """
    empty: dict[str, float | None] = dict.fromkeys(("main_cores", "other_cores", "machine_busy_cores", "machine_cores"))
    if before is None or after is None:
        return empty
    wall = after.wall_s - before.wall_s
    machine = after.machine_total_s - before.machine_total_s
    if wall <= 0 or machine <= 0:
        return empty
    return {
        "main_cores": (after.main_s - before.main_s) / wall,
        "other_cores": max(0.0, after.other_s - before.other_s) / wall,
        # the busy share of all cores' time, in cores
        "machine_busy_cores": after.cores * (after.machine_busy_s - before.machine_busy_s) / machine,
        "machine_cores": float(after.cores),
    }


#: a serving benchmark row's cores (:func:`add_server_cores`) and their column headers
CORE_COLUMNS = {"server_loop_cores": "loop c", "server_other_cores": "wrk c", "machine_busy_cores": "busy c"}


def add_server_cores(row: dict, before: CpuSnapshot | None, after: CpuSnapshot | None) -> None:
    """Put a serving benchmark row's window's cores in ``row``: ``server_loop_cores`` (the server's event loop, its
    main thread), ``server_other_cores`` (its other threads: batch worker, torch) and ``machine_busy_cores``."""
    shares = cpu_shares(before, after)
    row["server_loop_cores"] = shares["main_cores"]
    row["server_other_cores"] = shares["other_cores"]
    row["machine_busy_cores"] = shares["machine_busy_cores"]


def core_columns(row: dict | None = None) -> str:
    """The three :data:`CORE_COLUMNS` of ``row`` for a plain-text table, 6 wide each (``-`` where not measured);
    their headers without a row."""
    if row is None:
        return " ".join(f"{header:>6}" for header in CORE_COLUMNS.values())
    return " ".join("     -" if row.get(key) is None else f"{row[key]:>6.2f}" for key in CORE_COLUMNS)
