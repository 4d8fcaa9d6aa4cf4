"""Shared set-up of the engine tests: two gloo ranks started without the torchrun launcher.

``two_ranks(args, env, timeout) -> RanksResult`` starts ``python ARGS`` twice with the variables torchrun gives
its workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``),
so rank 0 hosts the rendezvous store itself. The launcher is a third Python process importing torch (about
3 CPU seconds per test); the tests of "two processes train like one" do not depend on it, and one test keeps
the real ``torch.distributed.run`` launch of ``-m raml`` (test_reliability.py::
test_extraction_shards_over_two_gloo_processes). Like torchrun, when one rank fails the other is
ended after a grace period rather than left waiting in a collective.

``rank_pair.run(args, env, timeout) -> RanksResult`` runs on the same pair kept alive for the whole session
(one per pytest worker): two ``rank_server.py`` processes that import torch and raml once and run each request
as ``python ARGS`` would (module ``__main__``, ``sys.argv``, stdout/stderr, working directory, thread count,
and torch's random generator seeded afresh as in a new process), in one gloo group made once. Two fresh
interpreters cost about 13 CPU seconds of imports before any work; the DDP tests with a pair of their own paid
that each. After a request that fails or times out the pair is ended (the ranks may be out of step in a
collective) and the next request starts a new one.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
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


#: variables a rank server applies per request instead of at its start (the thread count), or that change from
#: test to test without meaning to the ranks (pytest's own)
_PER_REQUEST = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTEST_CURRENT_TEST")
RANK_SERVER = Path(__file__).resolve().parent / "rank_server.py"


class RankPair:
    """Two ``rank_server.py`` processes (ranks 0 and 1 of a gloo group), started on the first request."""

    def __init__(self, workdirs: Callable[[], Path], preload: bool = True) -> None:
        self._workdirs = workdirs
        self._server = [sys.executable, str(RANK_SERVER), *(["--preload"] if preload else [])]
        self._procs: list[subprocess.Popen] = []
        self._env_key: dict[str, str] | None = None
        self.starts = 0  # how many pairs were started
        self.pids: list[int] = []  # the current pair's process ids

    def _start(self, env: dict[str, str]) -> None:
        port = str(_free_port())
        base = {k: v for k, v in env.items() if k not in _PER_REQUEST}
        logs = self._workdirs()
        for rank in range(2):
            rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
            rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            with open(logs / f"server{rank}.err", "w") as err:  # what a server prints outside any request
                self._procs.append(
                    subprocess.Popen(
                        self._server,
                        env=rank_env,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                    )
                )
        self._env_key = base
        self.starts += 1
        self.pids = [p.pid for p in self._procs]

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
            for stream in (proc.stdin, proc.stdout):
                stream.close()
        self._procs = []

    def run(
        self, args: list[str], env: dict[str, str], timeout: float = 300, grace_s: float = FAILED_RANK_GRACE_S
    ) -> RanksResult:
        base = {k: v for k, v in env.items() if k not in _PER_REQUEST}
        if not self._procs or any(p.poll() is not None for p in self._procs) or base != self._env_key:
            self.close()
            self._start(env)
        workdir = self._workdirs()
        logs = [(workdir / f"rank{rank}.out", workdir / f"rank{rank}.err") for rank in range(2)]
        for proc, (out, err) in zip(self._procs, logs):
            request = {"args": list(args), "cwd": os.getcwd(), "stdout": str(out), "stderr": str(err)}
            request["omp_num_threads"] = env.get("OMP_NUM_THREADS")
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
        codes: list[int | None] = [None, None]
        deadline = time.monotonic() + timeout
        failed_at, first_failure, timed_out = None, 0, False
        while None in codes:
            waiting = {self._procs[r].stdout: r for r in range(2) if codes[r] is None}
            ready, _, _ = select.select(list(waiting), [], [], 0.05)
            for stream in ready:
                line = stream.readline()  # a reply, or "" when the server died
                rank = waiting[stream]
                if line:
                    codes[rank] = json.loads(line)["returncode"]
                else:
                    codes[rank] = self._procs[rank].wait(timeout=60) or 1
            now = time.monotonic()
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at, first_failure = now, next(c for c in codes if c not in (None, 0))
            if failed_at is not None and now > failed_at + grace_s:
                break
            if now > deadline:
                timed_out = True
                break
        if timed_out or any(c != 0 for c in codes):
            self.close()  # a rank may be stuck in a collective or out of step with the other: start afresh
        if timed_out:
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
        return RanksResult(
            returncode=first_failure or next((c for c in codes if c not in (None, 0)), 0),
            stdout="".join(out.read_text() for out, _ in logs),
            stderr="".join(err.read_text() for _, err in logs),
        )


@pytest.fixture(scope="session")
def rank_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RankPair]:
    """The session's :class:`RankPair`: ``rank_pair.run(args, env, timeout, grace_s) -> RanksResult``, as
    ``two_ranks`` but without starting two interpreters per call. ``make test`` (``--dist loadfile``) runs each
    test file on one worker, so each worker that runs a file using it starts one pair."""
    pair = RankPair(lambda: tmp_path_factory.mktemp("rank_pair"))
    yield pair
    pair.close()


@pytest.fixture
def bare_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RankPair]:
    """A :class:`RankPair` of its own whose servers import nothing, for the launcher's tests (scripts without
    torch): it starts in a few hundredths of a second."""
    pair = RankPair(lambda: tmp_path_factory.mktemp("pair"), preload=False)
    yield pair
    pair.close()


# The end-to-end training tests (test_training.py, test_training_resume.py, test_training_modes.py): one small
# generated dataset in the CUB format and two teachers trained on it (a ResNet-18 for the distillation test, a
# test_resnet for the machinery tests), each made once per test session and shared by the pytest-xdist workers
# (``build_once``), so that the three files can run on different workers.

#: database (teacher) and query (student) image sizes of the training tests
TRAIN_DR, TRAIN_QR = 64, 32
#: the backbone of the teacher and student of the distillation test (test_training.py), which must show the
#: resolution asymmetry the method closes: a ResNet-18 sees the data's fine patterns at the wrong scale at QR
TRAIN_ARCH = "resnet18"
#: the backbone of the tests of the training machinery (resuming, seeds, modes, the search, devices), whose
#: meaning does not depend on the network: timm's test_resnet, about 6x cheaper a step than a ResNet-18 at these
#: sizes (forward + backward, 16 images, one thread: 20 / 49 ms at 32 / 64 px against 139 / 286 ms)
MACHINERY_ARCH = "test_resnet"


@dataclass(frozen=True)
class TrainingSetup:
    """The training tests' data root, image sizes (``dr`` database, ``qr`` query), backbone, and their two
    configurations: ``config(directory, **changes)`` (labels only) and ``distill_config(directory, teacher,
    **changes)`` (a ``ts_aug`` student of ``teacher``)."""

    data_root: Path
    dr: int = TRAIN_DR
    qr: int = TRAIN_QR
    arch: str = TRAIN_ARCH

    def config(self, directory: Path, **changes):
        from raml.engine.config import TrainConfig

        base = dict(
            training_dataset="cub",
            test_datasets=["cub-test"],
            data_root=str(self.data_root),
            directory=str(directory),
            pretrained=False,
            whitening=32,
            workers=0,
            batch_size=4,
            update_every=2,
            print_freq=1,
            val_freq=1,
            # save_freq left at its default (20): of model_epochN only the last epoch's is written (a ResNet-18
            # checkpoint with its Adam state is 134 MB, 0.1-0.3 s to write and fsync); model_last every epoch
            eval_batch_size=32,
            seed=7,
        )
        base.update(changes)
        return TrainConfig(**base)

    def distill_config(self, directory: Path, teacher: Path, **changes):
        values = dict(
            mode="ts_aug",
            student_path=str(teacher),
            teacher_path=str(teacher),
            image_size=TRAIN_QR,
            teacher_image_size=TRAIN_DR,
            lr=3e-4,
            lam_1=0.7,
            lam_2=0.7,
            pos_num=3,
            query_size=12,
            epochs=2,
            scheduler="none",
        )
        values.update(changes)
        return self.config(directory, **values)


def _training_data(folder: Path) -> None:
    from raml.data.synth import generate_synthetic_dataset

    # the demo's data design at a small size: 40 classes (20 train, 20 test) x 6 images, fine patterns that
    # survive at QR but that a DR-trained teacher sees at the wrong scale there
    generate_synthetic_dataset(
        folder / "cub", num_classes=40, images_per_class=6, image_size=TRAIN_DR, seed=3, pattern_period=(22.0, 28.0)
    )


@pytest.fixture(scope="session")
def training(build_once) -> TrainingSetup:
    """The training tests' :class:`TrainingSetup`, its dataset generated once per session."""
    return TrainingSetup(build_once("training_data", _training_data))


@pytest.fixture(scope="session")
def teacher_path(training: TrainingSetup, build_once) -> Path:
    """A ResNet-18 teacher trained with labels (sym) from random weights at DR on the train + val classes, once
    per session (six epochs, about 11 CPU s): the best checkpoint. Six epochs gave the distillation test the same
    margins as eight (test_training.py), at three quarters of the cost."""
    return build_once("training_teacher", _teacher_trainer(training, epochs=6)) / "model_best.pth.tar"


@pytest.fixture(scope="session")
def machinery(training: TrainingSetup) -> TrainingSetup:
    """:class:`TrainingSetup` on the same dataset with the machinery tests' backbone (``MACHINERY_ARCH``)."""
    return replace(training, arch=MACHINERY_ARCH)


@pytest.fixture(scope="session")
def machinery_teacher_path(machinery: TrainingSetup, build_once) -> Path:
    """A ``MACHINERY_ARCH`` teacher trained as :func:`teacher_path` for two epochs (about 2 s), for the tests
    whose point is the training machinery rather than what the student learns."""
    return build_once("machinery_teacher", _teacher_trainer(machinery, epochs=2)) / "model_best.pth.tar"


@pytest.fixture(scope="session")
def finished(machinery: TrainingSetup, machinery_teacher_path: Path, build_once) -> Path:
    """A finished one-epoch ts_aug run (exponential schedule, stepped per epoch) with the machinery teacher: its
    folder, made once per session (the resume tests of two files use it); a test copies it before changing it."""
    import torch

    from raml.engine.trainer import Trainer

    def make(folder: Path) -> None:
        config = machinery.distill_config(folder, machinery_teacher_path, epochs=1, val=False, scheduler="exponential")
        Trainer(config, torch.device("cpu"), progress=False).run()

    return build_once("finished_machinery_run", make)


def _teacher_trainer(training: TrainingSetup, epochs: int) -> Callable[[Path], None]:
    import torch

    from raml.engine.trainer import Trainer

    def train(folder: Path) -> None:
        config = training.config(
            folder,
            mode="sym",
            loss="normsoftmax",
            student=training.arch,
            image_size=TRAIN_DR,
            teacher_image_size=TRAIN_DR,
            epochs=epochs,
            lr=3e-3,
            query_size=10**6,
            batch_size=16,
            update_every=1,
            freeze_bn=False,
            trainval=True,
            val=False,
        )
        result = Trainer(config, torch.device("cpu"), progress=False).run()
        assert result.best_checkpoint == folder / "model_best.pth.tar" and result.best_checkpoint.is_file()
        assert (folder / "config.yaml").is_file()

    return train


#: the side of :func:`tiny_cub`'s images: the database size DR of test_reliability.py and test_ddp_small_batches.py
TINY_CUB_SIDE = 32


@pytest.fixture(scope="module")
def tiny_cub(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(data_root, checkpoint)``: a tiny CUB-format dataset (8 classes x 4 images of 32 px, the training
    classes 16 images, the test classes 16) and a random-weights ``test_resnet`` checkpoint (16-d whitening,
    torch seed 0), made once per test file (its tests may train from it; a test that damages images makes a
    dataset of its own under its ``tmp_path``)."""
    import torch

    from raml.data.synth import generate_synthetic_dataset
    from raml.models import build_network, save_checkpoint

    root = tmp_path_factory.mktemp("tiny_cub")
    generate_synthetic_dataset(
        root / "data" / "cub", num_classes=8, images_per_class=4, image_size=TINY_CUB_SIDE, seed=1
    )
    torch.manual_seed(0)
    network = root / "network.pth"
    save_checkpoint(network, build_network("test_resnet", whitening=16, pretrained=False))
    return root / "data", network
