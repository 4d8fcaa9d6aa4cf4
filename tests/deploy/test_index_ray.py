"""``raml index --engine ray`` (issue 22, item 2): Ray Data actors fill the same shards as the single-process path,
bit for bit; the actor pool leaves Ray's read/write tasks a CPU; a killed worker's shard is retried (slow).

One local Ray instance on 127.0.0.1 is shared by the tests of this module and shut down at its end."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raml.data import get_split
from raml.deploy import index_images, load_index
from raml.deploy.ray_engine import RayOptions, actor_pool, ray_engine
from raml.models import checkpoint_sha256, load_network

DR = 40
BATCH = 4
CPU = torch.device("cpu")


def test_the_actor_pool_leaves_a_cpu_for_reads_and_writes():
    assert actor_pool(2, 0, None) == (1, False)  # 2 actors on 2 CPUs deadlock (issue 22): one actor
    assert actor_pool(3, 0, None) == (2, False)
    assert actor_pool(16, 4, None) == (4, True)  # one actor per GPU
    with pytest.raises(ValueError, match="at most 1 actors"):
        actor_pool(2, 0, 2)
    with pytest.raises(ValueError, match="1 CPU"):
        actor_pool(1, 0, None)
    with pytest.raises(ValueError, match="GPUs"):
        actor_pool(16, 2, 3)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def world(synth_and_networks) -> dict:
    root, nets = synth_and_networks("resnet18", {"teacher": (8, 0)})
    paths = [str(p) for p in get_split("synth-test", root).abspaths()]
    return {"net": nets["teacher"], "paths": paths, "teacher": load_network(nets["teacher"])}


def test_ray_actors_give_bit_identical_embeddings_to_the_single_process_path(ray_instance, world, tmp_path):
    sha = checkpoint_sha256(world["net"])
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    index_images(world["teacher"], world["paths"], DR, local_dir, sha, batch_size=BATCH, shard_size=4)
    engine = ray_engine(RayOptions(str(world["net"]), DR, batch_size=BATCH, actors=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = index_images(world["teacher"], world["paths"], DR, ray_dir, sha, shard_size=4, engine=engine)
    ours = [f"{w.category.__name__}: {w.message}" for w in caught if Path(w.filename).name == "ray_engine.py"]
    assert ours == []  # no deprecated Ray argument (max_restarts in the remote args, Ray 2.60)
    assert summary["added"] == 20 and ray_instance.is_initialized()  # the shared instance is left running
    local, remote = load_index(local_dir), load_index(ray_dir)
    assert remote.paths == local.paths == world["paths"]
    np.testing.assert_array_equal(np.asarray(remote.embeddings), np.asarray(local.embeddings))
    assert not [p for p in ray_dir.iterdir() if p.name.startswith("shards-")]


def _map_workers() -> list[int]:
    """PIDs of Ray's map actors (process title ``ray::MapWorker(...)``), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"MapWorker" in cmdline and b"ShardEmbedder" in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_ray_worker_killed_mid_run_is_retried_and_every_row_ends_up_once(ray_instance, world, tmp_path):
    if not Path("/proc").is_dir():
        pytest.skip("finds the workers through /proc")
    sha = checkpoint_sha256(world["net"])
    index_dir = tmp_path / "index"
    killed: list[int] = []
    stop = threading.Event()

    def kill_one_worker_after_the_first_shard() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            folders = [p for p in index_dir.glob("shards-*")] if index_dir.exists() else []
            if folders and any(folders[0].glob("shard-*.json")):
                workers = _map_workers()
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_after_the_first_shard)
    killer.start()
    try:
        engine = ray_engine(RayOptions(str(world["net"]), DR, batch_size=2, actors=2))
        index_images(world["teacher"], world["paths"], DR, index_dir, sha, shard_size=2, engine=engine)
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray worker was found to kill"
    index = load_index(index_dir)
    assert index.paths == world["paths"] and index.live_count == 20  # every row, once, in order
    reference = load_index(_local_index(world, tmp_path)).embeddings
    np.testing.assert_array_equal(np.asarray(index.embeddings), np.asarray(reference))


def _local_index(world: dict, tmp_path: Path) -> Path:
    directory = tmp_path / "local"
    sha = checkpoint_sha256(world["net"])
    index_images(world["teacher"], world["paths"], DR, directory, sha, batch_size=2, shard_size=2)
    return directory


def _broken_jpeg(target: Path) -> str:
    """A JPEG that passes the header check before embedding (--bad-images) and fails in the decoder: a stray SOF
    marker inside the scan data (raml.data.check: only a full decode finds it)."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(noise).save(encoded, format="JPEG", quality=95)
    data = encoded.getvalue()
    middle = (data.find(b"\xff\xda") + len(data)) // 2
    target.write_bytes(data[:middle] + b"\xff\xc0\x00\x11" + data[middle + 4 :])
    return str(target)


def test_a_rerun_on_ray_without_a_file_that_failed_to_decode_reuses_the_finished_shards(ray_instance, world, tmp_path):
    """The shards before a file that stopped the run are reused by the rerun without it (here a local run, then
    Ray: the same runtime and batch size, so the same settings); only the shard of the removed file is embedded,
    no work folder is left and the rows are a clean local build's."""
    sha = checkpoint_sha256(world["net"])
    paths, index_dir = world["paths"][:10], tmp_path / "index"
    bad = _broken_jpeg(tmp_path / "zz-broken.jpg")
    with pytest.raises(Exception, match="zz-broken.jpg"):
        index_images(world["teacher"], [*paths, bad], DR, index_dir, sha, batch_size=BATCH, shard_size=4)
    Path(bad).unlink()
    engine = ray_engine(RayOptions(str(world["net"]), DR, batch_size=BATCH, actors=1))
    summary = index_images(world["teacher"], paths, DR, index_dir, sha, shard_size=4, engine=engine)
    assert (summary["shards"], summary["shards_computed"], summary["count"]) == (3, 1, 10)
    assert not [p for p in index_dir.iterdir() if p.name.startswith("shards-")]
    index_images(world["teacher"], paths, DR, tmp_path / "clean", sha, batch_size=BATCH, shard_size=4)
    clean = load_index(tmp_path / "clean")
    np.testing.assert_array_equal(np.asarray(load_index(index_dir).embeddings), np.asarray(clean.embeddings))


def test_an_unreadable_image_is_a_one_line_error_as_with_the_local_engine(ray_instance, world, tmp_path, capsys):
    from raml.cli import main as cli_main

    images = tmp_path / "images"
    images.mkdir()
    for path in world["paths"][:2]:
        (images / Path(path).name).write_bytes(Path(path).read_bytes())
    _broken_jpeg(images / "zz-broken.jpg")
    args = ["index", "--network-path", str(world["net"]), "--image-size", str(DR), "--images", str(images)]
    args += [
        "--output",
        str(tmp_path / "index"),
        "--no-progress",
        "--shard-size",
        "2",
        "--engine",
        "ray",
        "--ray-actors",
        "1",
    ]
    assert cli_main.main(args) == 2
    err = capsys.readouterr().err.strip()  # the logs, then the error
    (error,) = [line for line in err.splitlines() if line.startswith("raml index:")]
    assert error.startswith("raml index: error: Cannot load image") and "zz-broken.jpg" in error
    assert "RayTaskError" not in error
