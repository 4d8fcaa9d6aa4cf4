"""``raml.distributed.exit_process``, ``python -m raml``'s last step: a process in a process group ends without the
interpreter's finalisation (where a gloo rank could abort after its work was done), yet with its group destroyed,
its ``atexit`` functions run and its output flushed; without a group it is a plain ``SystemExit``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raml.distributed import exit_process

SCRIPT = """
import atexit, os, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import torch.distributed as dist
from raml.distributed import exit_process

marks = sys.argv[2]


class Finalised:
    def __init__(self):
        self.fd, self.write = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT), os.write

    def __del__(self):  # runs in the interpreter's finalisation, which exit_process skips
        self.write(self.fd, b"finalised\\n")


def mark(line):
    with open(marks, "a") as out:
        out.write(line + "\\n")


kept = Finalised()
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
atexit.register(lambda: mark(f"atexit group={dist.is_initialized()}"))
threading.Thread(target=lambda: (time.sleep(0.5), mark("thread done"))).start()  # not a daemon: joined first
idle = ThreadPoolExecutor(1)  # never shut down: its idle worker is not a daemon either, and must not hang the exit
idle.submit(lambda: None).result()
sys.stdout.write("unflushed output")  # a pipe: block-buffered until flushed
exit_process(3)
"""


def test_without_a_process_group_it_is_a_plain_system_exit(monkeypatch):
    import raml.distributed

    # whatever another test of this worker left behind, this process must not end here
    monkeypatch.setattr(raml.distributed.dist, "is_initialized", lambda: False)
    with pytest.raises(SystemExit) as stop:
        exit_process(4)
    assert stop.value.code == 4


def test_in_a_process_group_it_exits_with_the_code_after_atexit_and_flush_and_skips_finalisation(tmp_path: Path):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    marks = tmp_path / "marks.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # standard output block-buffered
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store"), str(marks)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout == "unflushed output"
    # the thread finished, then the group was destroyed before the atexit functions ran, and the interpreter did
    # not finalise
    assert marks.read_text().splitlines() == ["thread done", "atexit group=False"]


def test_both_launchers_end_through_run_and_a_process_group_through_exit_process(monkeypatch):
    import importlib.metadata

    import raml.__main__ as launcher
    import raml.distributed

    (script,) = importlib.metadata.entry_points(group="console_scripts", name="raml")
    assert script.value == "raml.__main__:run"  # the `raml` command, like `python -m raml`
    monkeypatch.setattr(launcher, "main", lambda: 5)
    ended: list[int] = []
    monkeypatch.setattr(raml.distributed, "exit_process", lambda code: ended.append(code) or sys.exit(code))
    with pytest.raises(SystemExit) as stop:
        launcher.run()
    assert stop.value.code == 5 and ended == [5]
