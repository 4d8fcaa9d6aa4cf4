"""The engine conftest's launchers (the DDP tests' stand-ins for torchrun): ``two_ranks`` (two fresh processes)
and ``RankPair`` (two processes kept for the session). Each rank gets torchrun's variables, a failed rank's exit
code is reported and the other rank ended, a hang times out; the pair runs each request as ``python ARGS`` would
in a fresh process and starts afresh after a failure."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

# the failed-rank tests' grace period and the hang tests' timeout: the other rank sleeps 120 s, so any short
# wait shows it was ended, not waited for
GRACE_S = 0.3

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
    result = two_ranks([script, "fail"], dict(os.environ), timeout=60, grace_s=GRACE_S)
    assert result.returncode == 3  # rank 1's, not the -9 of rank 0 killed after the grace period
    assert time.monotonic() - start < 30  # rank 0 (asleep for 120 s) was not waited for


def test_a_hang_times_out(two_ranks, script):
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        two_ranks([script, "hang"], dict(os.environ), timeout=GRACE_S)
    assert time.monotonic() - start < 30


# ------------------------------------------------------------------------------------- the persistent pair
REQUEST = """
import os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
print(" ".join(f"{k}={os.environ[k]}" for k in keys), os.getpid(), os.getcwd(), *sys.argv[1:], flush=True)
print("to stderr", os.environ["RANK"], file=sys.stderr)
mode = sys.argv[1]
if mode == "raise" and os.environ["RANK"] == "1":
    raise ValueError("boom in rank 1")
if mode == "message":
    raise SystemExit("a message, exit code 1")
if mode == "fail" and os.environ["RANK"] == "1":
    sys.exit(3)
if mode in ("fail", "hang"):
    import time
    time.sleep(120)
if mode == "exit0":
    sys.exit(0)
"""


@pytest.fixture
def request_script(tmp_path: Path) -> str:
    path = tmp_path / "request.py"
    path.write_text(REQUEST)
    return str(path)


def _lines(result) -> list[list[str]]:
    return [line.split() for line in result.stdout.splitlines()]


def test_the_pair_runs_each_request_in_the_same_two_processes_like_python_args(bare_pair, request_script, tmp_path):
    env = dict(os.environ)
    first = bare_pair.run([request_script, "ok", "a"], env, timeout=60)
    second = bare_pair.run([request_script, "exit0", "b"], env, timeout=60)
    assert first.returncode == second.returncode == 0 and bare_pair.starts == 1
    for result, argv in ((first, ["ok", "a"]), (second, ["exit0", "b"])):
        lines = _lines(result)
        assert [line[:4] for line in lines] == [
            ["RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=2", "LOCAL_WORLD_SIZE=2"],
            ["RANK=1", "LOCAL_RANK=1", "WORLD_SIZE=2", "LOCAL_WORLD_SIZE=2"],
        ]
        assert len({line[5] for line in lines}) == 1 and lines[0][4] == "MASTER_ADDR=127.0.0.1"
        assert [int(line[6]) for line in lines] == bare_pair.pids  # the pair's own processes, both times
        assert {line[7] for line in lines} == {os.getcwd()} and [line[8:] for line in lines] == [argv, argv]
        assert result.stderr.splitlines() == ["to stderr 0", "to stderr 1"]
    assert _lines(first)[0][5] == _lines(second)[0][5]  # one rendezvous, kept


def test_an_exception_in_a_request_exits_with_1_and_its_traceback_and_ends_the_pair(bare_pair, request_script):
    env = dict(os.environ)
    result = bare_pair.run([request_script, "raise"], env, timeout=60, grace_s=GRACE_S)
    assert result.returncode == 1 and "ValueError: boom in rank 1" in result.stderr
    old = bare_pair.pids
    result = bare_pair.run([request_script, "message"], env, timeout=60, grace_s=GRACE_S)
    assert result.returncode == 1 and "a message, exit code 1" in result.stderr
    assert bare_pair.starts == 2 and bare_pair.pids != old  # a failed request's pair is not reused
    assert bare_pair.run([request_script, "ok"], env, timeout=60).returncode == 0 and bare_pair.starts == 3


def test_a_failed_rank_of_the_pair_gives_its_exit_code_and_the_other_is_ended(bare_pair, request_script):
    start = time.monotonic()
    result = bare_pair.run([request_script, "fail"], dict(os.environ), timeout=60, grace_s=GRACE_S)
    assert result.returncode == 3
    assert time.monotonic() - start < 30  # rank 0 (asleep for 120 s) was not waited for
    assert bare_pair.run([request_script, "ok"], dict(os.environ), timeout=60).returncode == 0
    assert bare_pair.starts == 2


def test_a_hang_in_the_pair_times_out(bare_pair, request_script):
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        bare_pair.run([request_script, "hang"], dict(os.environ), timeout=GRACE_S)
    assert time.monotonic() - start < 30


def test_a_request_with_other_variables_gets_a_pair_started_with_them(bare_pair, request_script):
    env = dict(os.environ)
    assert bare_pair.run([request_script, "ok"], env, timeout=60).returncode == 0
    assert bare_pair.run([request_script, "ok"], dict(env, OMP_NUM_THREADS="1"), timeout=60).returncode == 0
    assert bare_pair.starts == 1  # the thread count is set per request
    assert bare_pair.run([request_script, "ok"], dict(env, RAML_TEST_X="1"), timeout=60).returncode == 0
    assert bare_pair.starts == 2


TORCH_REQUEST = """
import sys, torch
print(torch.get_num_threads(), *torch.rand(3).tolist())
torch.manual_seed(5)  # moves the process's global state; the next request must not see it
torch.set_num_threads(2)
"""


def test_the_sessions_pair_gives_each_request_a_fresh_processs_torch_state(rank_pair, tmp_path):
    script = tmp_path / "torch_request.py"
    script.write_text(TORCH_REQUEST)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    results = [rank_pair.run([str(script)], env, timeout=120) for _ in range(2)]
    assert all(r.returncode == 0 for r in results), results[-1].stderr[-3000:]
    left = torch.rand(3, generator=torch.Generator().manual_seed(5)).tolist()  # what request 1 left behind
    lines = [line.split() for result in results for line in result.stdout.splitlines()]
    assert len(lines) == 4 and {threads for threads, *_ in lines} == {"1"}
    values = [tuple(float(v) for v in rest) for _, *rest in lines]
    assert tuple(left) not in values and len(set(values)) == 4  # seeded afresh, per process and per request
