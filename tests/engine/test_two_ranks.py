"""The engine conftest's ``two_ranks`` launcher (the DDP tests' stand-in for torchrun): each rank gets
torchrun's variables, a failed rank's exit code is reported and the other rank ended, a hang times out."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = """
import os, sys, time
rank = int(os.environ["RANK"])
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
print(" ".join(f"{k}={os.environ[k]}" for k in keys), flush=True)
mode = sys.argv[1]
if mode == "fail" and rank == 1:
    sys.exit(3)
if mode in ("fail", "hang"):
    time.sleep(120)
"""


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "rank.py"
    path.write_text(SCRIPT)
    return str(path)


def test_each_rank_gets_torchruns_variables(two_ranks, script):
    result = two_ranks([script, "ok"], dict(os.environ), timeout=60)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert [line.split()[:4] for line in lines] == [
        ["RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=2", "LOCAL_WORLD_SIZE=2"],
        ["RANK=1", "LOCAL_RANK=1", "WORLD_SIZE=2", "LOCAL_WORLD_SIZE=2"],
    ]
    ports = {line.split()[5] for line in lines}  # one rendezvous for both
    assert len(ports) == 1 and lines[0].split()[4] == "MASTER_ADDR=127.0.0.1"


def test_a_failed_rank_gives_its_exit_code_and_the_other_is_ended(two_ranks, script):
    start = time.monotonic()
    result = two_ranks([script, "fail"], dict(os.environ), timeout=60, grace_s=1.0)
    assert result.returncode == 3  # rank 1's, not the -9 of rank 0 killed after the grace period
    assert time.monotonic() - start < 30  # rank 0 (asleep for 120 s) was not waited for


def test_a_hang_times_out(two_ranks, script):
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        two_ranks([script, "hang"], dict(os.environ), timeout=2.0)
    assert time.monotonic() - start < 30
