"""raml.bench.cpu: a process's CPU split into its main thread and the rest, and the machine's, from /proc."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from raml.bench.cpu import (
    CpuSnapshot,
    add_server_cores,
    core_columns,
    cpu_shares,
    cpu_snapshot,
    machine_seconds,
    thread_seconds,
)

TICKS = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def _stat_line(comm: str, utime: int, stime: int) -> str:
    # pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime cutime ...
    return f"4242 ({comm}) R 1 4242 4242 0 -1 4194304 100 0 0 0 {utime} {stime} 7 9 20 0 3 0 5 0 0\n"


@pytest.mark.parametrize("comm", ["python", "a b", "x) R 1 2 3 4 5 6 7 8 9 10 11 12 (y", "(("])
def test_thread_seconds_reads_utime_and_stime_after_the_last_parenthesis(comm):
    # a command name with spaces and parentheses (a process may name itself anything) must not shift the fields
    assert thread_seconds(_stat_line(comm, 250, 50), 100.0) == pytest.approx(3.0)
    # cutime/cstime (children's time, fields 16-17) are not the thread's own
    assert thread_seconds(_stat_line(comm, 0, 0), 100.0) == 0.0


def test_machine_seconds_counts_busy_and_idle_time_of_all_cores():
    text = (
        "cpu  100 20 30 400 50 6 7 8 0 0\n"
        "cpu0 50 10 15 200 25 3 3 4 0 0\n"
        "cpu1 50 10 15 200 25 3 4 4 0 0\n"
        "intr 12345 0 0\nctxt 999\n"
    )
    busy, total, cores = machine_seconds(text, 10.0)
    # busy: user + nice + system + irq + softirq + steal; total adds idle and iowait (guest time is in user already)
    assert busy == pytest.approx((100 + 20 + 30 + 6 + 7 + 8) / 10.0)
    assert total == pytest.approx((100 + 20 + 30 + 400 + 50 + 6 + 7 + 8) / 10.0)
    assert cores == 2
    with pytest.raises(ValueError, match="no 'cpu' line"):
        machine_seconds("intr 1\n", 10.0)


def test_shares_are_the_differences_over_the_window_in_cores():
    before = CpuSnapshot(wall_s=10.0, main_s=1.0, other_s=2.0, machine_busy_s=50.0, machine_total_s=100.0, cores=2)
    after = CpuSnapshot(wall_s=12.0, main_s=1.5, other_s=3.6, machine_busy_s=53.0, machine_total_s=104.0, cores=2)
    shares = cpu_shares(before, after)
    assert shares == pytest.approx(
        {"main_cores": 0.25, "other_cores": 0.8, "machine_busy_cores": 1.5, "machine_cores": 2.0}
    )
    missing = dict.fromkeys(("main_cores", "other_cores", "machine_busy_cores", "machine_cores"))
    assert cpu_shares(None, after) == missing and cpu_shares(before, None) == missing
    assert cpu_shares(after, after) == missing  # an empty window has no share


def test_a_missing_proc_gives_none_not_an_error(tmp_path: Path):
    assert cpu_snapshot(os.getpid(), proc=tmp_path) is None
    (tmp_path / "stat").write_text("cpu  1 0 0 1 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0\n")
    assert cpu_snapshot(123456789, proc=tmp_path) is None  # the process is gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_a_busy_thread_counts_as_other_threads_and_a_sleeping_main_thread_does_not():
    stop = threading.Event()
    spun = [0.0]  # the worker's own CPU seconds so far (time.thread_time), read by the sleeping main thread

    def spin() -> None:
        start = time.thread_time()
        while not stop.is_set():
            sum(range(1000))
            spun[0] = time.thread_time() - start

    before = cpu_snapshot(os.getpid())
    worker = threading.Thread(target=spin)
    worker.start()
    deadline = time.monotonic() + 20.0
    while spun[0] < 0.3 and time.monotonic() < deadline:  # however busy the machine, until the worker has run 0.3 s
        time.sleep(0.05)  # the main thread sleeps while the worker spins
    spun_at_snapshot = spun[0]
    after = cpu_snapshot(os.getpid())
    stop.set()
    worker.join()
    assert spun_at_snapshot >= 0.3, "the worker got no CPU in 20 s"
    # the kernel's accounting (10 ms ticks) of the other threads holds at least what the worker measured itself
    assert after.other_s - before.other_s >= spun_at_snapshot - 0.05
    assert after.main_s - before.main_s < 0.5 * spun_at_snapshot  # the sleeping main thread: next to none
    shares = cpu_shares(before, after)
    assert shares["main_cores"] + shares["other_cores"] <= shares["machine_busy_cores"] + 0.1
    assert shares["machine_cores"] == os.cpu_count()


def test_a_rows_cores_and_their_columns():
    before = CpuSnapshot(wall_s=0.0, main_s=0.0, other_s=0.0, machine_busy_s=0.0, machine_total_s=10.0, cores=2)
    after = CpuSnapshot(wall_s=5.0, main_s=2.5, other_s=4.0, machine_busy_s=8.0, machine_total_s=20.0, cores=2)
    row: dict = {}
    add_server_cores(row, before, after)
    assert row == pytest.approx({"server_loop_cores": 0.5, "server_other_cores": 0.8, "machine_busy_cores": 1.6})
    assert core_columns(row) == "  0.50   0.80   1.60"
    assert core_columns() == "loop c  wrk c busy c"
    add_server_cores(row, None, after)  # not measured (no /proc): dashes, not zeros
    assert core_columns(row) == "     -      -      -"
