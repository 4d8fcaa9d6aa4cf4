"""``raml index --bad-images {error,skip}``: the images to embed are checked (headers only) before any embedding;
``error`` refuses and changes nothing, ``skip`` indexes the rest, lists the bad ones and resumes its shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raml.cli import main as cli_main
from raml.data import get_split
from raml.deploy import embed_images, index_images, load_index
from raml.deploy.bad_images import IndexBadImagesError
from raml.deploy.shards import embed_missing_shards
from raml.models import checkpoint_sha256, load_network

DR = 40
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory, synth_and_networks) -> dict:
    """8 good BMP images, 3 bad files (truncated JPEG, empty, text named .png) and an 8-d teacher."""
    base = tmp_path_factory.mktemp("badimg")
    root, nets = synth_and_networks("resnet18", {"teacher": (8, 0)})
    split = get_split("synth-test", root)
    images = base / "images"
    images.mkdir()
    good = []
    for i, path in enumerate(split.abspaths()[:8]):
        Image.open(path).convert("RGB").save(images / f"img{i:02d}.bmp")
        good.append(str(images / f"img{i:02d}.bmp"))
    Image.open(split.abspaths()[8]).convert("RGB").save(images / "whole.jpg", quality=90)
    data = (images / "whole.jpg").read_bytes()
    (images / "whole.jpg").unlink()
    (images / "cut.jpg").write_bytes(data[: len(data) // 2])
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.png").write_text("not an image\n")
    bad = [str(images / name) for name in ("cut.jpg", "empty.jpg", "notes.png")]
    return {
        "good": good,
        "bad": bad,
        "net": nets["teacher"],
        "teacher": load_network(nets["teacher"]),
        "sha": checkpoint_sha256(nets["teacher"]),
    }


def counting_engine(network, calls: list[list[str]], fail_after: int | None = None):
    """The local engine with a record of the shards it embeds; a kill (KeyboardInterrupt) after ``fail_after``."""

    def embed(paths: list[str]) -> np.ndarray:
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("simulated kill")
        calls.append(list(paths))
        return embed_images(network, paths, DR, [CPU], batch_size=4)

    return lambda plan: embed_missing_shards(plan, embed)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and "images_index" not in p.name}


def test_error_mode_refuses_before_embedding_and_leaves_the_index_untouched(world, tmp_path, capsys):
    index_dir = tmp_path / "index"
    good, bad = world["good"], world["bad"]
    index_images(world["teacher"], good[:4], DR, index_dir, world["sha"])
    before = snapshot(index_dir)
    assert "index.json" in before and len(before) > 4  # index.json and the generation's files

    calls: list[list[str]] = []
    teacher = world["teacher"]
    mixed = [good[4], bad[0], good[5], bad[1], bad[2]]
    with pytest.raises(IndexBadImagesError) as refused:
        index_images(teacher, mixed, DR, index_dir, world["sha"], engine=counting_engine(teacher, calls))
    assert calls == []  # refused before any embedding
    assert snapshot(index_dir) == before
    message = str(refused.value)
    assert message.startswith("3 of the 5 images to embed are bad") and "--bad-images skip" in message
    assert "empty file (0 bytes)" in message and "truncated JPEG" in message and "not an image" in message
    report = index_dir / "bad_images_index.txt"
    assert refused.value.report_file == report
    assert [line.split("\t")[0] for line in report.read_text().splitlines()] == bad

    # the CLI: exit 2, one message; a new index folder is not even created (the list goes to a temporary file)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(mixed) + "\n")
    fresh = tmp_path / "fresh"
    argv = ["index", "--network-path", str(world["net"]), "--image-size", str(DR), "--list", str(listing)]
    assert cli_main.main([*argv, "--output", str(fresh), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "raml index: error: 3 of the 5 images to embed are bad" in err and "--bad-images skip" in err
    assert not fresh.exists()


def test_skip_mode_indexes_the_rest_and_lists_the_bad_ones(world, tmp_path, capsys):
    index_dir = tmp_path / "index"
    good, bad = world["good"], world["bad"]
    mixed = [good[0], bad[0], good[1], good[2], bad[1], good[3], bad[2], good[4]]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(mixed) + "\n")
    summary = tmp_path / "summary.json"
    argv = ["index", "--network-path", str(world["net"]), "--image-size", str(DR), "--list", str(listing)]
    argv += ["--output", str(index_dir), "--device", "cpu", "--no-progress", "--bad-images", "skip"]
    assert cli_main.main([*argv, "--json", str(summary)]) == 0
    assert "3 bad image(s) skipped" in capsys.readouterr().out
    report = json.loads(summary.read_text())
    assert (report["bad_images_skipped"], report["added"], report["count"]) == (3, 5, 5)
    skipped = index_dir / "skipped_images_index.txt"
    assert report["bad_images_report"] == str(skipped)
    assert [line.split("\t")[0] for line in skipped.read_text().splitlines()] == bad
    index = load_index(index_dir)
    assert index.paths == good[:5]  # consecutive ids: the skipped files took none
    queries = embed_images(world["teacher"], good[:5], DR, [CPU])
    scores, ids = index.search(queries, 5)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert {index.paths[i] for i in ids.ravel()} == set(good[:5])

    # an append of one more good image: the bad ones are checked again, skipped again, the rest unchanged
    listing.write_text("\n".join([*mixed, good[5]]) + "\n")
    assert cli_main.main([*argv, "--json", str(summary)]) == 0
    report = json.loads(summary.read_text())
    assert (report["bad_images_skipped"], report["added"], report["skipped"], report["count"]) == (3, 1, 5, 6)
    assert load_index(index_dir).paths == good[:6]


def test_a_killed_skip_run_resumes_its_finished_shards(world, tmp_path):
    index_dir = tmp_path / "index"
    good, bad = world["good"], world["bad"]
    mixed = [good[0], bad[0], good[1], good[2], bad[1], good[3], good[4], bad[2], good[5], good[6], good[7]]
    teacher, sha = world["teacher"], world["sha"]
    first: list[list[str]] = []
    kill_after_two = counting_engine(teacher, first, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        index_images(teacher, mixed, DR, index_dir, sha, shard_size=2, bad_images="skip", engine=kill_after_two)
    assert first == [good[0:2], good[2:4]] and not (index_dir / "index.json").exists()

    # the same inputs again, killed after one more shard: the two finished shards are reused, not recomputed
    second: list[list[str]] = []
    kill_after_one = counting_engine(teacher, second, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        index_images(teacher, mixed, DR, index_dir, sha, shard_size=2, bad_images="skip", engine=kill_after_one)
    assert second == [good[4:6]]
    # the bad files taken out of the list instead (default policy): the same job, its three shards reused
    third: list[list[str]] = []
    summary = index_images(teacher, good, DR, index_dir, sha, shard_size=2, engine=counting_engine(teacher, third))
    assert third == [good[6:8]]
    assert (summary["added"], summary["bad_images_skipped"], summary["count"]) == (8, 0, 8)
    assert load_index(index_dir).paths == good

    # nothing but bad images for a new index: a clear error, and no folder left behind
    with pytest.raises(ValueError, match="All 3 images to index are bad"):
        index_images(teacher, bad, DR, tmp_path / "none", sha, bad_images="skip")
    assert not (tmp_path / "none").exists()


def test_a_changed_indexed_file_that_is_now_bad_keeps_its_row_when_skipped(world, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for source in world["good"][:3]:
        paths.append(str(images / Path(source).name))
        Path(paths[-1]).write_bytes(Path(source).read_bytes())
    index_dir = tmp_path / "index"
    teacher, sha = world["teacher"], world["sha"]
    index_images(teacher, paths, DR, index_dir, sha)
    before = load_index(index_dir)
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:20])  # truncated: the header is cut
    with pytest.raises(IndexBadImagesError, match="1 of the 1 images to embed are bad"):
        index_images(teacher, paths, DR, index_dir, sha)
    summary = index_images(teacher, [*paths, world["good"][5]], DR, index_dir, sha, bad_images="skip")
    assert (summary["added"], summary["reembedded"], summary["bad_images_skipped"]) == (1, 0, 1)
    after = load_index(index_dir)
    assert after.paths == [*paths, world["good"][5]]
    np.testing.assert_array_equal(np.asarray(after.embeddings[:3]), np.asarray(before.embeddings))
    assert after.stamps[1] == before.stamps[1]  # checked again by the next run
