"""Shared pytest fixtures: tiny datasets in the exact on-disk formats, written into a fresh ``tmp_path``.

Every dataset fixture returns the data root (``<tmp_path>/data``); images are tiny (40x30) so that one
fixture sets up in well under a second.

- ``cub_root``: ``cub/images.txt`` + ``cub/images/<NNN.Bird_NNN>/Bird_NNN_<j>.jpg``; 200 classes x 2 images.
  Lines are shuffled (deterministically), so classes first appear in a non-numeric order and image ids are
  not sorted. With val_ratio 0.5: 50 train, 50 val, 100 test classes.
- ``cars_root``: ``cars/cars_annos.mat`` (struct array ``annotations`` + ``class_names``) +
  ``cars/car_ims/NNNNNN.jpg``; 196 classes x 2 images, rows in a shuffled order: 49 / 49 / 98 classes.
- ``sop_root``: ``sop/Ebay_train.txt`` (12 classes x 3 images, rows shuffled) and ``sop/Ebay_test.txt``
  (6 classes with 2, 3, 4, 2, 3, 4 images) under ``<super>_final/<name>.JPG``: 6 / 6 / 6 classes.
- ``own_root``: ``mine/split.json`` + ``mine/images/<part>_<c>/<i>.jpg``; 4 train, 2 val, 3 test classes
  x 3 images.
- ``folder_root``: ``folders/train/{ant,bee,cat}/`` (2 images each; ``bee`` has ``b.PNG`` upper case and a
  ``notes.txt`` that is not an image) and ``folders/test/{dog,eel}/`` (3 images each); no val.
- ``image_factory``: ``make(path, size=(40, 30), color=(r, g, b), mode="RGB") -> Path`` writes one image.
- ``one_torch_thread``: torch limited to one thread for the test (not autouse; a module opts in with
  ``pytestmark``).
- ``build_once``: ``build(name, make) -> folder``, made once per session and shared by the pytest-xdist workers.
- ``random_network``: ``make(architecture, whitening dim, seed) -> checkpoint path``, through ``build_once``.

Under ``make test`` (``-n auto --dist loadfile``) the files are handed out longest first
(``pytest_xdist_make_scheduler`` below).
"""

from __future__ import annotations

import gc
import json
import os
import random
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY = (40, 30)


def _fresh_tqdm_locks_in_child() -> None:
    """Give a forked child tqdm write locks of its own.

    tqdm's global thread lock is a class attribute; a process forked while another of its threads holds it (tqdm's
    monitor thread takes it every few seconds) inherits it held by a thread that does not exist in the child, and
    the child's first progress bar waits for ever. mutmut runs each mutant's tests in a child forked from one
    parent (scripts/mutate.py): every ``blocked_scores`` mutant hung there at no CPU until this, counted as a
    timeout. The child's bars then no longer share tqdm's multiprocessing lock with the parent (bars interleave,
    nothing waits)."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    std.TqdmDefaultWriteLock.th_lock = threading.RLock()
    std.TqdmDefaultWriteLock.mp_lock = None  # not a new multiprocessing lock: that would fix the start method
    fresh = std.TqdmDefaultWriteLock()
    classes = [std.tqdm]
    while classes:  # tqdm.auto's class and other subclasses keep the lock their get_lock() made, on themselves
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if "_lock" in vars(cls):
            cls._lock = fresh
    std.tqdm.set_lock(fresh)


os.register_at_fork(after_in_child=_fresh_tqdm_locks_in_child)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto``), give each worker its share of the cores for torch,
    so that N workers do not each start as many threads as there are cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        # the processes a test starts (torchrun, a killed-and-resumed training) inherit the same count, so
        # that a run in this process and one in a child reduce in the same order (bit-identical weights)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)


def prune_old_basetemps(root: Path, keep: int, lock_dead_before: float) -> list[Path]:
    """Remove the numbered ``pytest-N`` folders under ``root`` that pytest removes at the session's end: all but
    the ``keep`` highest numbers (``tmp_path_retention_count``), each only if no live session holds its lock,
    with pytest's own functions (so the rules are pytest's). Returns the folders it was asked to remove."""
    from _pytest.pathlib import cleanup_candidates, try_cleanup

    if keep < 1:  # the current session's folder would be a candidate too (retention policy "none")
        return []
    candidates = list(cleanup_candidates(root, "pytest-", keep))
    for path in candidates:
        try_cleanup(path, lock_dead_before)
    return candidates


_early_prune: threading.Thread | None = None
_prune_args: tuple[Path, int, float] | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Prepare the early removal of the old runs' temporary folders (started by the first test, below).

    pytest keeps the last 3 runs' ``pytest-N`` folders and removes the older ones when the session finishes, in
    the controller, after every test: a run of this suite leaves ~5 GB in ~37,000 files (a ResNet-18 checkpoint
    is 45 MB, 134 MB with its Adam state), and removing one took 5.9-6.1 s of wall time at the end of each run
    (docs/benchmarks.md "Ninth pass"). A thread removes the same folders while the tests run; pytest's own clean-up
    at the end then finds them gone. Skipped in xdist workers, with ``--basetemp`` or where pytest's internals
    differ."""
    global _prune_args
    config = session.config
    factory = getattr(config, "_tmp_path_factory", None)
    if os.environ.get("PYTEST_XDIST_WORKER") or factory is None or config.option.basetemp:
        return
    try:
        from _pytest.pathlib import LOCK_TIMEOUT

        keep = int(config.getini("tmp_path_retention_count"))
        if config.getini("tmp_path_retention_policy") == "none":
            keep = 0
        basetemp = factory.getbasetemp()  # made now rather than when xdist first asks for it
        _prune_args = (basetemp.parent, keep, basetemp.stat().st_mtime - LOCK_TIMEOUT)
    except (ImportError, AttributeError, ValueError, OSError):
        return


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    """At the first test, once the workers have started (removing the folders during their start-up delayed the
    first test by ~2.4 s: 9.9-10.2 s against 7.4-7.9 s), start the removal that :func:`pytest_sessionstart`
    prepared."""
    global _early_prune
    if _prune_args is not None and _early_prune is None:
        _early_prune = threading.Thread(
            target=prune_old_basetemps, args=_prune_args, name="prune-basetemps", daemon=True
        )
        _early_prune.start()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Wait for :func:`pytest_sessionstart`'s removal before pytest's own clean-up runs over the same folders."""
    if _early_prune is not None:
        _early_prune.join()


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """At the session's end, collect the garbage once and freeze what is left (``gc.freeze``): pytest's own
    collections after this one and the interpreter's exit then skip the session's heap (hundreds of networks
    built, ~700,000 objects), which took ~2.5 s per process (docs/benchmarks.md "Test suite"). The collection
    runs first, while pytest's unraisable-exception hook still listens, so a finaliser that raises is reported
    as before."""
    gc.collect()
    gc.freeze()


# Order of the files under `make test` (-n auto --dist loadfile). xdist's loadfile hands out whole files, largest
# test count first, so a file of a few long tests (the training files) started last and kept one worker busy for
# a minute while the other had finished. Here the files known to be long go first, longest first (the other
# worker takes the next ones, and the many short files fill in at the end, so both workers end together), and
# the files that share one per-worker resource travel as one unit. Seconds: wall time of each file on the idle
# 2-core machine with 2 workers (RAML_TEST_PROFILE run of 2026-12-04 23:58, docs/benchmarks.md "Test suite"); only
# the order matters, a file missing here goes after these, largest test count first as before.
_FILE_SECONDS = {
    "tests/engine/test_training.py": 41,  # with its own ResNet-18 teacher (about 25 s)
    "tests/deploy/test_index_ray.py": 19,
    "tests/cli/test_test_extract.py": 18,
    "tests/deploy/test_serve_bench.py": 17,
    "tests/deploy/test_adaptive_serve.py": 16,
    "tests/retrieval/test_metrics.py": 15,
    "tests/deploy/test_serve.py": 14,
    "tests/deploy/test_serve_limits.py": 13,
    "tests/models/test_checkpoints.py": 12,
    "tests/cli/test_reference_train.py": 12,
    "tests/engine/test_training_modes.py": 11,
    "tests/data/test_download.py": 11,
    "tests/engine/test_methods.py": 10,
    "tests/deploy/test_index_search.py": 9,
    "tests/test_demo.py": 8,
    "tests/deploy/test_loadgen.py": 6,
    "tests/engine/test_multires.py": 6,
    "tests/deploy/test_queue_wait.py": 6,
    "tests/deploy/test_index_shards.py": 5,
    "tests/retrieval/test_cpu_runtime.py": 5,
    "tests/data/test_archives.py": 5,
    "tests/deploy/test_index_lifecycle.py": 5,
}
# files run as one unit on one worker: the DDP tests share the worker's pair of gloo ranks (tests/engine/
# conftest.py ``rank_pair``, about 15 CPU s to start), which a second worker would start again
_UNITS = {
    "tests/engine/test_reliability.py": "rank_pair",
    "tests/engine/test_gpu_paths.py": "rank_pair",
    "tests/engine/test_two_ranks.py": "rank_pair",
}
_UNIT_SECONDS = {"rank_pair": 44}


def _unit_of(nodeid: str) -> str:
    file = nodeid.split("::", 1)[0]
    return _UNITS.get(file, file)


def longest_first(units: dict[str, int]) -> list[str]:
    """The units (``{unit: its number of tests}``, a unit being a file or a ``_UNITS`` name) in the order of
    their known seconds, longest first, then the others by test count, largest first."""
    return sorted(units, key=lambda unit: (-_UNIT_SECONDS.get(unit, _FILE_SECONDS.get(unit, 0)), -units[unit]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile``: xdist's file scheduling with the units and order of :func:`longest_first`."""
    if config.getvalue("dist") != "loadfile":
        return None
    from collections import OrderedDict

    from xdist.scheduler import LoadFileScheduling

    class LongestFirstFileScheduling(LoadFileScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return _unit_of(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:  # the first call: the queue holds every unit, none handed out yet
                self.ordered = True
                order = longest_first({unit: len(tests) for unit, tests in self.workqueue.items()})
                self.workqueue = OrderedDict((unit, self.workqueue[unit]) for unit in order)
            super()._assign_work_unit(node)

    return LongestFirstFileScheduling(config, log)


def _file_states(folder: Path) -> dict[str, list[int]]:
    """``{relative path: [size, mtime_ns]}`` of every file under ``folder`` but ``.done`` and ``cache/``: raml
    writes its embedding cache under a data root (``<data-root>/cache/embeddings``, keyed by the checkpoint's
    content hash and the settings, each entry written atomically), which the tests using a shared dataset share
    by design."""
    states = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if relative.parts[0] != "cache" and path.name != ".done" and path.is_file():
            stat = path.stat()
            states[str(relative)] = [stat.st_size, stat.st_mtime_ns]
    return states


@pytest.fixture(scope="session")
def build_once(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[Path], None]], Path]:
    """``build(name, make) -> folder``: ``make(folder)`` runs once per test session, in whichever pytest-xdist
    worker asks first; the other workers wait for it (a file lock) and get the same folder. For an artefact
    that costs seconds to make (a trained network) and that tests in several files use: each file can then run
    on either worker without making it again. A ``make`` that failed leaves no folder marked done: the next
    worker to ask makes it again (and fails the same way).

    The folder is shared, so a test must only read it: ``.done`` records every file's size and modification
    time (but raml's embedding cache, see :func:`_file_states`), and a call that finds the folder changed since
    it was made (a file written, removed or added) fails, naming the files, instead of handing a changed
    artefact to the next test."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # <session>/popen-gwN -> <session>, common to the session's workers

    def build(name: str, make: Callable[[Path], None]) -> Path:
        folder = base / f"once-{name}"
        with open(base / f"once-{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                done = folder / ".done"
                if not done.is_file():
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir()
                    make(folder)
                    done.write_text(json.dumps(_file_states(folder)))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        made, now = json.loads(done.read_text()), _file_states(folder)
        if now != made:
            changed = sorted(path for path in made.keys() | now.keys() if made.get(path) != now.get(path))
            raise RuntimeError(
                f"the shared artefact {folder} changed after it was made ({', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''}): a test wrote into it; write under the test's tmp_path"
            )
        return folder

    return build


def _random_network(folder: Path, architecture: str, dim: int, seed: int) -> None:
    import torch

    from raml.models import build_network, save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(folder / "network.pth", build_network(architecture, whitening=dim, pretrained=False))


@pytest.fixture(scope="session")
def random_network(build_once) -> Callable[[str, int, int], Path]:
    """``make(architecture, whitening dim, torch seed) -> checkpoint path``: a randomly initialised network
    (``build_network(..., pretrained=False)`` after ``torch.manual_seed(seed)``), written once per test session
    and shared by every module and worker that asks for the same three values (a ResNet-18 checkpoint is 45 MB
    and ~0.2 s to build and write). The file is shared: read it, never write to it or next to it."""

    def make(architecture: str, dim: int, seed: int) -> Path:
        name = f"net-{architecture.replace('/', '_')}-{dim}-{seed}"
        return build_once(name, lambda folder: _random_network(folder, architecture, dim, seed)) / "network.pth"

    return make


# Opt-in profile of the suite's own cost: RAML_TEST_PROFILE=<folder> writes one line per test phase
# (setup, call, teardown) into <folder>/<worker>.tsv: test id, phase, wall s, this process's CPU s, and the
# CPU s of the child processes that ended during the phase. CPU time does not depend on the machine's load,
# so it is what to compare before and after a change on a shared machine (docs/benchmarks.md, "Test suite").
_PROFILE_DIR = os.environ.get("RAML_TEST_PROFILE")


def _cpu_clocks() -> tuple[float, float, float]:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time(), children.ru_utime + children.ru_stime


def _profile_phase(item: pytest.Item, phase: str) -> Iterator[None]:
    start = _cpu_clocks()
    yield
    end = _cpu_clocks()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(Path(_PROFILE_DIR) / f"{worker}.tsv", "a") as f:
        f.write("\t".join([item.nodeid, phase, *(f"{b - a:.3f}" for a, b in zip(start, end))]) + "\n")


if _PROFILE_DIR:
    Path(_PROFILE_DIR).mkdir(parents=True, exist_ok=True)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
        yield from _profile_phase(item, "setup")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
        yield from _profile_phase(item, "call")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
        yield from _profile_phase(item, "teardown")


def _class_color(k: int) -> tuple[int, int, int]:
    return ((37 * k) % 256, (91 * k + 50) % 256, (173 * k + 100) % 256)


def write_noisy_image(path: Path, color: tuple[int, int, int], rng: np.random.Generator, size=TINY) -> Path:
    """Solid ``color`` plus a little noise, saved in the format given by the suffix."""
    w, h = size
    pixels = np.asarray(color, dtype=np.int16)[None, None, :] + rng.integers(-20, 21, size=(h, w, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path, format=fmt)
    return path


def make_image(
    path: str | Path,
    size: tuple[int, int] = TINY,
    color: tuple[int, int, int] = (200, 100, 50),
    mode: str = "RGB",
) -> Path:
    """Write a solid-colour image of ``size`` (w, h) in ``mode``; the format follows the file suffix.

    ``I;16`` and ``I`` store ``color[0] * 257`` (16-bit), ``F`` stores ``color[0] / 255``; other modes are
    ``Image.new("RGB", size, color).convert(mode)``.
    """
    path = Path(path)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(np.full((h, w), color[0] * 257, dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(np.full((h, w), color[0] * 257, dtype=np.int32))
    elif mode == "F":
        img = Image.fromarray(np.full((h, w), color[0] / 255, dtype=np.float32))
    else:
        img = Image.new("RGB", size, tuple(color)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny
    networks gain nothing from two, and a busy shared machine makes two much slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_factory() -> Callable[..., Path]:
    """``make(path, size=(40, 30), color=(r, g, b), mode="RGB") -> Path``: write one image file."""
    return make_image


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    """CUB-200-2011 layout with 200 classes x 2 images, index lines in a shuffled order."""
    root = tmp_path / "data"
    folder = root / "cub"
    rng = np.random.default_rng(0)
    lines = []
    image_id = 0
    for k in range(1, 201):
        class_folder = f"{k:03d}.Bird_{k:03d}"
        for j in range(2):
            image_id += 1
            rel = f"{class_folder}/Bird_{k:03d}_{j}.jpg"
            write_noisy_image(folder / "images" / rel, _class_color(k), rng)
            lines.append(f"{image_id} {rel}")
    random.Random(0).shuffle(lines)
    (folder / "images.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def cars_root(tmp_path: Path) -> Path:
    """Cars196 layout: ``cars_annos.mat`` in the real structure, 196 classes x 2 images in shuffled rows."""
    import scipy.io

    root = tmp_path / "data"
    folder = root / "cars"
    rng = np.random.default_rng(1)
    rows = [(k, j) for k in range(1, 197) for j in range(2)]
    random.Random(1).shuffle(rows)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (k, _) in enumerate(rows):
        rel = f"car_ims/{i + 1:06d}.jpg"
        write_noisy_image(folder / rel, _class_color(k), rng)
        annotations[0, i] = (
            np.array([rel]),
            np.array([[1]], dtype=np.uint8),
            np.array([[2]], dtype=np.uint8),
            np.array([[38]], dtype=np.uint8),
            np.array([[28]], dtype=np.uint8),
            np.array([[k]], dtype=np.uint8),
            np.array([[i % 2]], dtype=np.uint8),
        )
    class_names = np.empty((1, 196), dtype=object)
    for k in range(196):
        class_names[0, k] = np.array([f"Make Model {k + 1} 2012"])
    scipy.io.savemat(folder / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return root


@pytest.fixture
def sop_root(tmp_path: Path) -> Path:
    """SOP layout: 12 train classes x 3 images (rows shuffled), 6 test classes with 2-4 images."""
    root = tmp_path / "data"
    folder = root / "sop"
    rng = np.random.default_rng(2)
    supers = ["bicycle", "chair", "lamp"]
    header = "image_id class_id super_class_id path"

    def rows_for(classes: list[tuple[int, int]], start_id: int) -> list[str]:
        rows = []
        image_id = start_id
        for k, n in classes:
            s = (k - 1) % 3
            for j in range(n):
                rel = f"{supers[s]}_final/{111000000 + k}_{j}.JPG"
                write_noisy_image(folder / rel, _class_color(k), rng)
                rows.append(f"{image_id} {k} {s + 1} {rel}")
                image_id += 1
        return rows

    train_rows = rows_for([(k, 3) for k in range(1, 13)], 1)
    random.Random(2).shuffle(train_rows)
    test_rows = rows_for([(13, 2), (14, 3), (15, 4), (16, 2), (17, 3), (18, 4)], 100)
    (folder / "Ebay_train.txt").write_text("\n".join([header, *train_rows]) + "\n")
    (folder / "Ebay_test.txt").write_text("\n".join([header, *test_rows]) + "\n")
    return root


@pytest.fixture
def own_root(tmp_path: Path) -> Path:
    """Own dataset ``mine`` with ``split.json``: 4 train, 2 val, 3 test classes x 3 images."""
    root = tmp_path / "data"
    folder = root / "mine"
    rng = np.random.default_rng(3)
    split: dict[str, list[list[str]]] = {}
    k = 0
    for part, n_classes in (("train", 4), ("val", 2), ("test", 3)):
        split[part] = []
        for c in range(n_classes):
            k += 1
            paths = [f"images/{part}_{c}/{i}.jpg" for i in range(3)]
            for p in paths:
                write_noisy_image(folder / p, _class_color(k), rng)
            split[part].append(paths)
    (folder / "split.json").write_text(json.dumps(split, indent=1))
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """Folder-per-class dataset ``folders``: train/{ant,bee,cat} x 2 images, test/{dog,eel} x 3 images."""
    root = tmp_path / "data"
    folder = root / "folders"
    rng = np.random.default_rng(4)
    layout = {
        "train": {"ant": ["a.png", "b.png"], "bee": ["a.png", "b.PNG"], "cat": ["x.png", "y.png"]},
        "test": {"dog": ["1.png", "2.png", "3.png"], "eel": ["1.png", "2.png", "3.png"]},
    }
    for k, (part, name, files) in enumerate((p, c, fs) for p, cs in layout.items() for c, fs in cs.items()):
        for f in files:
            write_noisy_image(folder / part / name / f, _class_color(k), rng)
    (folder / "train" / "bee" / "notes.txt").write_text("not an image\n")
    return root
