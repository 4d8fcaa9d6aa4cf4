"""Shared set-up of the engine tests: two gloo ranks started without the torchrun launcher.

``two_ranks(args, env, timeout) -> RanksResult`` starts ``python ARGS`` twice with the variables torchrun gives
its workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``),
so rank 0 hosts the rendezvous store itself. The launcher is a third Python process importing torch (about
3 CPU seconds per test); the tests of "two processes train like one" do not depend on it, and two tests keep
the real ``torch.distributed.run`` launch (test_extraction_shards_over_two_gloo_processes,
test_convnext_student_trains_in_two_gloo_processes_like_one). Like torchrun, when one rank fails the other is
ended after a grace period rather than left waiting in a collective.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

#: seconds the other rank may keep running after one rank failed, before it is killed
FAILED_RANK_GRACE_S = 30.0


@dataclass
class RanksResult:
    """What ``subprocess.run`` would give for the pair: the exit code of the rank that failed first (else 0)
    and both outputs, rank 0's first."""

    returncode: int
    stdout: str
    stderr: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(
    args: list[str], env: dict[str, str], timeout: float, workdir: Path, grace_s: float = FAILED_RANK_GRACE_S
) -> RanksResult:
    port = str(_free_port())
    procs, logs = [], []
    for rank in range(2):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        out, err = workdir / f"rank{rank}.out", workdir / f"rank{rank}.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, stdout=fo, stderr=fe))
        logs.append((out, err))
    deadline = time.monotonic() + timeout
    failed_at, first_failure, timed_out = None, 0, False
    try:
        while None in [p.poll() for p in procs]:  # a list: every rank polled, so each exit code is seen
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at, first_failure = now, next(p.returncode for p in procs if p.returncode not in (None, 0))
            if failed_at is not None and now > failed_at + grace_s:
                break
            if now > deadline:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=60)
    if timed_out:
        raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
    codes = [p.returncode for p in procs]
    return RanksResult(
        returncode=first_failure or next((c for c in codes if c != 0), 0),
        stdout="".join(out.read_text() for out, _ in logs),
        stderr="".join(err.read_text() for _, err in logs),
    )


@pytest.fixture
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., RanksResult]:
    """``run(args, env, timeout, grace_s) -> RanksResult``: ``python ARGS`` as ranks 0 and 1 of a two-process
    group; raises ``subprocess.TimeoutExpired`` (both ranks killed) past ``timeout`` seconds."""

    def run(
        args: list[str], env: dict[str, str], timeout: float = 300, grace_s: float = FAILED_RANK_GRACE_S
    ) -> RanksResult:
        return _run_two_ranks(args, env, timeout, tmp_path_factory.mktemp("ranks"), grace_s)

    return run
