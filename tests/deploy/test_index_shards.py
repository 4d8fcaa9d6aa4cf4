"""Streaming, resumable extraction (issue 22, item 1): shards with checksums, resume after a kill, a damaged
shard recomputed, and the committed index equal to a one-pass extraction."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from raml.data import get_split
from raml.deploy import embed_images, index_images, load_index
from raml.deploy.shards import ShardPlan, embed_missing_shards, plan_shards, remove_stale_shards
from raml.models import checkpoint_sha256, load_network
from raml.retrieval.extract import extract_embeddings

DR = 40
CPU = torch.device("cpu")
BATCH = 4


@pytest.fixture(scope="module")
def setup(synth_and_networks) -> dict:
    root, nets = synth_and_networks("resnet18", {"teacher": (8, 0)})
    split = get_split("synth-test", root)
    teacher = load_network(nets["teacher"])
    paths = [str(p) for p in split.abspaths()]
    # today's path: one extraction of every image, in batches of BATCH
    reference = extract_embeddings(teacher, paths, DR, CPU, batch_size=BATCH, progress=False).numpy()
    return {"net": nets["teacher"], "teacher": teacher, "paths": paths, "reference": reference, "root": root}


def counting_engine(network, calls: list[list[str]], fail_after: int | None = None):
    """The local engine with a record of the shards it embeds; raises KeyboardInterrupt (a kill) after
    ``fail_after`` shards."""

    def embed(paths: list[str]) -> np.ndarray:
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("simulated kill")
        calls.append(list(paths))
        return embed_images(network, paths, DR, [CPU], batch_size=BATCH)

    return lambda plan: embed_missing_shards(plan, embed)


def shard_folders(index_dir: Path) -> list[Path]:
    return sorted(p for p in index_dir.iterdir() if p.is_dir() and p.name.startswith("shards-"))


def test_shards_round_trip_and_a_damaged_shard_is_detected(tmp_path):
    rng = np.random.default_rng(0)
    paths = [f"img{i}.jpg" for i in range(10)]
    plan = plan_shards(tmp_path, paths, ["1:2"] * 10, "abc", 32, shard_size=4)
    assert plan.num_shards == 3 and [plan.bounds(i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert plan.missing() == [0, 1, 2]
    rows = rng.standard_normal((10, 6)).astype(np.float32)
    for i in range(3):
        start, stop = plan.bounds(i)
        plan.write(i, rows[start:stop])
    assert plan.missing() == []
    np.testing.assert_array_equal(np.concatenate([r for _, r in plan.iter_rows()]), rows)
    record = json.loads((plan.directory / "shard-000001.json").read_text())
    assert record["paths"] == paths[4:8] and record["rows"] == 4 and record["dim"] == 6
    # one flipped byte in the rows of shard 1: detected by the checksum, and reading it refuses
    rows_file = plan.directory / "shard-000001.npy"
    data = bytearray(rows_file.read_bytes())
    data[-3] ^= 0xFF
    rows_file.write_bytes(bytes(data))
    assert plan.missing() == [1]
    with pytest.raises(ValueError, match="missing or damaged"):
        plan.read(1)
    # a record naming other paths, a truncated file, a missing record
    (plan.directory / "shard-000002.json").write_text(json.dumps({**record, "start": 8, "stop": 10}))
    (plan.directory / "shard-000000.npy").write_bytes(b"")
    assert plan.missing() == [0, 1, 2]
    # the same job with another file stamp or network is another folder: its shards are never reused
    assert plan_shards(tmp_path, paths, ["1:3"] * 10, "abc", 32, 4).directory != plan.directory
    assert plan_shards(tmp_path, paths, ["1:2"] * 10, "abd", 32, 4).directory != plan.directory
    assert plan_shards(tmp_path, paths, ["1:2"] * 10, "abc", 32, 4).directory == plan.directory


def test_shard_plan_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(tmp_path, ["a"], ["s"], "abc", 32, shard_size=0)
    with pytest.raises(ValueError, match="stamps"):
        plan_shards(tmp_path, ["a", "b"], ["s"], "abc", 32)
    plan = ShardPlan(tmp_path, ["a", "b", "c"], ["s"] * 3, 2)
    with pytest.raises(ValueError, match="needs 2 rows"):
        plan.write(0, np.zeros((3, 4), np.float32))


def test_a_killed_run_resumes_and_never_recomputes_finished_shards(setup, tmp_path):
    index_dir = tmp_path / "index"
    sha = checkpoint_sha256(setup["net"])
    paths, teacher = setup["paths"], setup["teacher"]
    first: list[list[str]] = []
    with pytest.raises(KeyboardInterrupt):
        index_images(teacher, paths, DR, index_dir, sha, shard_size=4, engine=counting_engine(teacher, first, 2))
    assert len(first) == 2 and not (index_dir / "index.json").exists()
    (folder,) = shard_folders(index_dir)
    assert sorted(p.name for p in folder.glob("shard-*.json")) == ["shard-000000.json", "shard-000001.json"]

    second: list[list[str]] = []
    summary = index_images(teacher, paths, DR, index_dir, sha, shard_size=4, engine=counting_engine(teacher, second))
    assert second == [paths[8:12], paths[12:16], paths[16:20]]  # shards 0 and 1 were not recomputed
    assert summary["added"] == 20 and summary["count"] == 20
    index = load_index(index_dir)
    assert index.paths == paths
    # bit-identical to one extraction of all images (same batches: shard size a multiple of the batch size)
    np.testing.assert_array_equal(np.asarray(index.embeddings), setup["reference"])
    assert shard_folders(index_dir) == []  # committed: the work folder is gone
    scores, ids = index.search(setup["reference"][:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_a_damaged_shard_is_recomputed_and_the_rest_kept(setup, tmp_path):
    index_dir = tmp_path / "index"
    sha = checkpoint_sha256(setup["net"])
    paths, teacher = setup["paths"], setup["teacher"]

    def crash() -> None:
        raise KeyboardInterrupt("killed before the commit")

    first: list[list[str]] = []
    with pytest.raises(KeyboardInterrupt):
        index_images(
            teacher,
            paths,
            DR,
            index_dir,
            sha,
            shard_size=4,
            engine=counting_engine(teacher, first),
            before_commit=crash,
        )
    assert len(first) == 5 and not (index_dir / "index.json").exists()
    (folder,) = shard_folders(index_dir)
    rows_file = folder / "shard-000003.npy"
    data = bytearray(rows_file.read_bytes())
    data[-1] ^= 0x01  # one bit of one embedding
    rows_file.write_bytes(bytes(data))
    second: list[list[str]] = []
    index_images(teacher, paths, DR, index_dir, sha, shard_size=4, engine=counting_engine(teacher, second))
    assert second == [paths[12:16]]
    np.testing.assert_array_equal(np.asarray(load_index(index_dir).embeddings), setup["reference"])


def test_an_append_streams_through_shards_and_equals_one_pass(setup, tmp_path):
    index_dir = tmp_path / "index"
    sha = checkpoint_sha256(setup["net"])
    paths, teacher = setup["paths"], setup["teacher"]
    index_images(teacher, paths[:8], DR, index_dir, sha, shard_size=4, batch_size=BATCH)
    summary = index_images(teacher, paths, DR, index_dir, sha, shard_size=4, batch_size=BATCH)
    assert summary["added"] == 12 and summary["skipped"] == 8
    index = load_index(index_dir)
    assert index.paths == paths and index.meta["generation"] == 2
    np.testing.assert_array_equal(np.asarray(index.embeddings), setup["reference"])


def test_the_driver_killed_by_sigkill_resumes_from_its_shards(setup, tmp_path, capsys):
    """A real `raml index` process killed (SIGKILL) once some shards exist; the rerun keeps them. The rerun is the
    same command in this process (`raml.cli.main.main`): resuming reads only what the killed process left on disk,
    and a second interpreter would cost its start-up (importing torch, timm, raml) again."""
    index_dir = tmp_path / "index"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(setup["paths"]))
    command = [
        sys.executable,
        "-m",
        "raml",
        "index",
        "--network-path",
        str(setup["net"]),
        "--image-size",
        str(DR),
        "--list",
        str(listing),
        "--output",
        str(index_dir),
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            folders = shard_folders(index_dir) if index_dir.exists() else []
            if any(len(list(f.glob("shard-*.json"))) >= 2 for f in folders):
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed; use more images"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    (folder,) = shard_folders(index_dir)
    kept = {p.name: p.read_bytes() for p in folder.glob("shard-*")}
    assert len(kept) >= 4 and not (index_dir / "index.json").exists()
    done = len(list(folder.glob("shard-*.json")))
    from raml.cli.main import main

    capsys.readouterr()
    assert command[1:3] == ["-m", "raml"] and main(command[3:]) == 0
    assert f"{done} of 10 shards already done" in capsys.readouterr().err  # resumed, not restarted
    index = load_index(index_dir)
    assert index.paths == setup["paths"]
    np.testing.assert_allclose(np.asarray(index.embeddings), setup["reference"], atol=1e-6)


def _undecodable_png(source: str, target: Path) -> str:
    """A PNG that passes the header and end-marker check (valid chunks and CRCs) but fails to decode."""
    import struct
    import zlib

    from PIL import Image

    Image.open(source).convert("RGB").save(target, format="PNG")
    data = bytearray(target.read_bytes())
    at = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    body = bytearray(data[at + 4 : at + 4 + length])
    for j in range(2, len(body) - 4):
        body[j] ^= 0x5A
    data[at + 4 : at + 4 + length] = body
    data[at + 4 + length : at + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)) & 0xFFFFFFFF)
    target.write_bytes(bytes(data))
    return str(target)


def test_a_decode_error_keeps_the_finished_shards_for_the_rerun_without_the_file(setup, tmp_path):
    """Following the advice of a decoding error (remove the file, rerun) reuses the shards before it: only the
    shards from the removed file on are embedded again, no work folder is left, the rows are a clean build's."""
    index_dir = tmp_path / "index"
    sha = checkpoint_sha256(setup["net"])
    paths, teacher = setup["paths"][:10], setup["teacher"]
    bad = _undecodable_png(paths[0], tmp_path / "bad.png")
    first: list[list[str]] = []
    with pytest.raises(Exception, match="bad.png"):
        index_images(teacher, [*paths, bad], DR, index_dir, sha, shard_size=4, engine=counting_engine(teacher, first))
    assert first == [paths[:4], paths[4:8], [*paths[8:], bad]]  # the third shard (with the bad file) failed
    (folder,) = shard_folders(index_dir)
    assert len(list(folder.glob("shard-*.json"))) == 2
    Path(bad).unlink()
    second: list[list[str]] = []
    summary = index_images(teacher, paths, DR, index_dir, sha, shard_size=4, engine=counting_engine(teacher, second))
    assert second == [paths[8:10]] and summary["count"] == 10  # only the shard of the removed file
    assert shard_folders(index_dir) == []  # nothing orphaned
    clean = index_images(teacher, paths, DR, tmp_path / "clean", sha, shard_size=4, engine=counting_engine(teacher, []))
    np.testing.assert_array_equal(
        np.asarray(load_index(index_dir).embeddings), np.asarray(load_index(clean["index_dir"]).embeddings)
    )


def test_a_job_with_a_file_taken_out_reuses_the_shards_before_it_and_cleans_up_the_rest(tmp_path):
    rng = np.random.default_rng(1)
    paths, stamps = [f"img{i}.jpg" for i in range(10)], [f"{i}:1" for i in range(10)]
    rows = {p: rng.standard_normal(6).astype(np.float32) for p in paths}

    def fill(plan: ShardPlan) -> None:
        for i in plan.missing():
            plan.write(i, np.stack([rows[p] for p in plan.shard_paths(i)]))

    first = plan_shards(tmp_path, paths, stamps, "abc", 32, 4)
    fill(first)
    other = plan_shards(tmp_path, ["x.jpg", "y.jpg"], ["1:1", "2:2"], "abc", 32, 4)  # another pending job
    other.write(0, np.zeros((2, 6), np.float32))
    elsewhere = plan_shards(tmp_path, paths, stamps, "abc", 48, 4)  # the same images at another size
    kept = paths[:5] + paths[6:]  # img5 taken out: shard 0 unchanged, shards 1 and 2 shifted
    second = plan_shards(tmp_path, kept, stamps[:5] + stamps[6:], "abc", 32, 4)
    assert second.directory != first.directory and second.missing() == [1, 2]  # shard 0 moved in, checked
    assert json.loads((second.directory / "shard-000000.json").read_text())["paths"] == kept[:4]
    fill(second)
    np.testing.assert_array_equal(np.concatenate([r for _, r in second.iter_rows()]), [rows[p] for p in kept])
    remove_stale_shards(second)  # the commit: the first job's shifted shards can never match again
    assert not first.directory.exists()
    assert other.missing() == [] and elsewhere.directory.is_dir()
    # a stamp change is another shard key: the changed file's shard is recomputed, the others reused
    changed = plan_shards(tmp_path, kept, stamps[:5] + ["6:2"] + stamps[7:], "abc", 32, 4)
    assert changed.missing() == [1]  # shards 0 and 2 moved in from the second job's folder


def test_a_shard_record_without_a_shard_key_still_resumes_its_own_job(tmp_path):
    """Records written before shard keys (no key, no stamps) are valid in their own folder, whose key covers the
    stamps; a record with a key for other stamps is not."""
    plan = plan_shards(tmp_path, ["a.jpg", "b.jpg"], ["1:1", "2:2"], "abc", 32, 1)
    plan.write(0, np.ones((1, 3), np.float32))
    plan.write(1, np.ones((1, 3), np.float32))
    for i in range(2):
        record_file = plan.directory / f"shard-{i:06d}.json"
        record = json.loads(record_file.read_text())
        if i == 0:
            del record["key"], record["stamps"]
        else:
            record["stamps"] = ["9:9"]
        record_file.write_text(json.dumps(record))
    assert plan.missing() == [1]
