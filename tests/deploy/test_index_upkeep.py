"""Index upkeep across runs: paths recognised from any working directory, leftovers of killed runs removed, other
jobs' shards kept, list files parsed line by line (the audit of `raml index`, 2026-12-05)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

from raml.deploy import IndexDirectoryError, index_images, load_index
from raml.deploy.bad_images import REPORT_NAMES, SKIP_REPORT
from raml.deploy.shards import ShardPlan
from raml.deploy.store import remove_leftovers

DIM = 8
SHA = "0" * 64
_BMP = io.BytesIO()
Image.new("RGB", (1, 1)).save(_BMP, format="BMP")
TINY_BMP = _BMP.getvalue()  # passes raml index's header check (--bad-images); bytes appended make each file unique


def content_rows(paths: list[str]) -> np.ndarray:
    """Deterministic unit rows from each file's content only (the same file gives the same row by any path)."""
    out = []
    for path in paths:
        seed = int.from_bytes(hashlib.sha256(Path(path).read_bytes()).digest()[:8], "little")
        x = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        out.append(x / np.linalg.norm(x))
    return np.stack(out)


def fake_engine(plan: ShardPlan) -> dict:
    for i in plan.missing():
        plan.write(i, content_rows(plan.shard_paths(i)))
    return {"engine": "fake"}


def make_files(folder: Path, count: int, start: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img{i:05d}.jpg"
        path.write_bytes(TINY_BMP + f"image {i}".encode())
        paths.append(str(path))
    return paths


def index(index_dir: Path, paths: list[str], **kwargs) -> dict:
    kwargs.setdefault("engine", fake_engine)
    return index_images(nn.Identity(), paths, 32, index_dir, SHA, shard_size=4, **kwargs)


def test_relative_paths_are_the_same_images_from_another_working_directory(tmp_path, monkeypatch):
    make_files(tmp_path / "cwd1" / "sub" / "db", 6)
    index_dir = tmp_path / "index"
    names = [f"img{i:05d}.jpg" for i in range(6)]
    monkeypatch.chdir(tmp_path / "cwd1")
    first = index(index_dir, [f"sub/db/{n}" for n in names])
    assert first["added"] == 6
    stored = load_index(index_dir).paths
    assert stored == [str(tmp_path / "cwd1" / "sub" / "db" / n) for n in names]  # absolute
    # the same files, named relative to another working directory: nothing added
    monkeypatch.chdir(tmp_path / "cwd1" / "sub")
    again = index(index_dir, [f"db/{n}" for n in names])
    assert again["added"] == 0 and again["skipped"] == 6 and again["count"] == 6
    # and removed by a third name
    monkeypatch.chdir(tmp_path / "cwd1" / "sub" / "db")
    removed = index(index_dir, [], remove=[names[0]])
    assert removed["removed"] == 1 and removed["not_found"] == [] and removed["count"] == 5


def test_relative_paths_of_an_older_index_are_keyed_against_the_working_directory(tmp_path, monkeypatch):
    make_files(tmp_path / "db", 4)
    index_dir = tmp_path / "index"
    monkeypatch.chdir(tmp_path)
    index(index_dir, [str(tmp_path / "db" / f"img{i:05d}.jpg") for i in range(4)])
    # an index written before paths were stored absolute holds them as given
    meta = json.loads((index_dir / "index.json").read_text())
    paths_file = index_dir / meta["files"]["paths"]
    paths_file.write_text(json.dumps([f"db/img{i:05d}.jpg" for i in range(4)], indent=0) + "\n")
    report = index(index_dir, [f"db/img{i:05d}.jpg" for i in range(4)], remove=["db/img00000.jpg"])
    assert report["added"] == 0 and report["removed"] == 1 and report["count"] == 3
    assert load_index(index_dir).paths[1] == "db/img00001.jpg"  # kept as stored


def _plant_leftovers(index_dir: Path) -> list[str]:
    """What a writer SIGKILLed at each stage leaves (the names the audit found), generation 2 uncommitted."""
    names = [
        ".embeddings-000002.npy.1a2b3c4d.tmp",
        ".invlists-000002.ivfdata.5e6f7a8b.tmp",
        ".index-000002.faiss.0badc0de.tmp",
        ".index.json.feedbeef.tmp",
        "embeddings-000002.npy",
        "index-000002.faiss",
    ]
    for name in names:
        (index_dir / name).write_bytes(b"x" * 100)
    parts = index_dir / ".invlists-000002.ivfdata.parts-9c8d7e6f.tmp"
    parts.mkdir()
    (parts / "part-000000.faiss").write_bytes(b"x")
    return [*names, parts.name]


def test_leftovers_of_killed_runs_are_removed_by_the_next_writer_even_when_it_changes_nothing(tmp_path):
    paths = make_files(tmp_path / "db", 6)
    index_dir = tmp_path / "index"
    index(index_dir, paths)
    committed = sorted(p.name for p in index_dir.iterdir())
    planted = _plant_leftovers(index_dir)
    (index_dir / "notes.txt").write_text("mine")  # not raml's: never touched
    (index_dir / "embeddings-old.npy").write_text("mine")
    report = index(index_dir, paths)  # nothing to change
    assert report["added"] == 0 and report["count"] == 6
    left = sorted(p.name for p in index_dir.iterdir())
    assert not set(planted) & set(left)
    assert left == sorted([*committed, "notes.txt", "embeddings-old.npy"])
    assert len(load_index(index_dir)) == 6


def test_a_kill_between_the_commit_and_the_shard_clean_up_is_cleaned_by_the_next_writer(tmp_path, monkeypatch):
    import raml.deploy.index as index_module

    paths = make_files(tmp_path / "db", 10)
    index_dir = tmp_path / "index"
    index(index_dir, paths[:6])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the commit")

    with monkeypatch.context() as patch:
        patch.setattr(index_module, "remove_shard_folder", killed)
        with contextlib.suppress(KeyboardInterrupt):
            index(index_dir, paths)
    assert load_index(index_dir).live_count == 10  # committed
    assert [p.name for p in index_dir.iterdir() if p.name.startswith("shards-")]  # its work folder left
    index(index_dir, paths)  # nothing to change
    assert not [p.name for p in index_dir.iterdir() if p.name.startswith("shards-")]


def test_a_killed_first_build_leaves_nothing_but_its_shards_and_a_foreign_folder_is_untouched(tmp_path):
    paths = make_files(tmp_path / "db", 6)
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    planted = _plant_leftovers(index_dir)
    index(index_dir, paths)
    assert not set(planted) & {p.name for p in index_dir.iterdir()}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    planted = _plant_leftovers(foreign)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(IndexDirectoryError, match="holds no raml index"):
        index(foreign, paths)
    assert set(planted) <= {p.name for p in foreign.iterdir()}
    # a killed first build of --bad-images skip leaves its report beside the leftovers: still raml's own folder
    reported = tmp_path / "reported"
    reported.mkdir()
    planted = _plant_leftovers(reported)
    (reported / SKIP_REPORT).write_text("bad.jpg\ttruncated\n")
    remove_leftovers(reported, own_files=REPORT_NAMES)
    assert sorted(p.name for p in reported.iterdir()) == [SKIP_REPORT]


def test_a_commit_keeps_another_interrupted_jobs_shards_and_names_them(tmp_path, caplog):
    paths = make_files(tmp_path / "db", 20)
    index_dir = tmp_path / "index"
    index(index_dir, paths[:4])
    embedded: list[str] = []

    def engine(kill_after: int | None):
        def run(plan: ShardPlan) -> dict:
            for n, i in enumerate(plan.missing()):
                if kill_after is not None and n == kill_after:
                    raise KeyboardInterrupt("killed")
                embedded.extend(plan.shard_paths(i))
                plan.write(i, content_rows(plan.shard_paths(i)))
            return {}

        return run

    with pytest.raises(KeyboardInterrupt):
        index(index_dir, paths, engine=engine(2))  # the append of 16 images: 2 of its 4 shards done
    (pending,) = [p.name for p in index_dir.iterdir() if p.name.startswith("shards-")]
    embedded.clear()
    with caplog.at_level("INFO", logger="raml.deploy.index"):
        assert index(index_dir, [], remove=[paths[0]])["removed"] == 1  # another job commits
    assert [p.name for p in index_dir.iterdir() if p.name.startswith("shards-")] == [pending]
    assert pending in caplog.text and "rm -r" in caplog.text
    report = index(index_dir, paths[1:], engine=engine(None))  # the append again, id for id
    assert report["added"] == 16 and report["count"] == 19
    assert embedded == paths[12:]  # only its 2 missing shards were embedded
    assert not [p.name for p in index_dir.iterdir() if p.name.startswith("shards-")]


def test_a_list_file_splits_at_newlines_only_and_keeps_every_other_character(tmp_path):
    from raml.deploy.image_files import read_image_list

    names = ["a\u2028b.jpg", "c\x1cd\x1de\x1ef.jpg", "g\x85h.jpg", "in side.jpg", "./#hash.jpg", "\u00a0nbsp.jpg"]
    lines = [f"{name}\r" if i % 2 else f" \t{name} " for i, name in enumerate(names)]  # stray blanks, CRLF
    text = "# a comment\r\n  # an indented comment\n\n \t \n" + "\n".join(lines) + "\n"
    listing = tmp_path / "list.txt"
    listing.write_text(text, encoding="utf-8", newline="")
    assert read_image_list(listing) == [str(tmp_path / name) for name in names]


@pytest.mark.parametrize("kind", ["embeddings", "labels", "paths", "index"])
def test_an_empty_file_of_the_index_is_named_and_overwrite_rebuilds_it(tmp_path, kind):
    paths = make_files(tmp_path / "db", 5)
    index_dir = tmp_path / "index"
    index(index_dir, paths)
    (damaged,) = index_dir.glob(f"{kind}-*")
    damaged.write_bytes(b"")  # a full disk, an interrupted copy: np.load raises EOFError on it
    with pytest.raises(IndexDirectoryError, match=rf"damaged: {damaged.name} is unreadable.*--overwrite"):
        load_index(index_dir)
    with pytest.raises(IndexDirectoryError, match=damaged.name):  # an append reads the index first
        index(index_dir, paths)
    report = index(index_dir, paths, overwrite=True)  # the documented repair
    assert report["count"] == 5
    assert load_index(index_dir).paths == paths


def test_a_dotdot_after_a_linked_folder_is_another_file_and_plain_paths_are_not_resolved(tmp_path, monkeypatch):
    from raml.deploy.image_files import image_key

    here = make_files(tmp_path / "a", 1)[0]  # a/img00000.jpg
    (elsewhere,) = make_files(tmp_path / "other", 1, start=7)
    Path(elsewhere).rename(tmp_path / "other" / "img00000.jpg")  # another file of the same name
    (tmp_path / "other" / "sub").mkdir()
    (tmp_path / "a" / "link").symlink_to(tmp_path / "other" / "sub")
    via_link = str(tmp_path / "a" / "link" / ".." / "img00000.jpg")  # other/img00000.jpg, not a/img00000.jpg
    assert Path(via_link).read_bytes() != Path(here).read_bytes()
    index_dir = tmp_path / "index"
    report = index(index_dir, [here, via_link])
    assert report["added"] == 2 and report["count"] == 2
    assert index(index_dir, [str(tmp_path / "other" / "img00000.jpg")])["added"] == 0  # the same file again
    # a '..' that steps out of no link keeps the lexical identity; a path without '..' is never resolved (a
    # realpath per path made appends of large lists 45x slower)
    assert image_key(str(tmp_path / "a" / ".." / "a" / "img00000.jpg")) == image_key(here)
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, **kw: calls.append(p) or real(p, **kw))
    assert image_key(here) == here and image_key("x..y.jpg") == os.path.abspath("x..y.jpg")
    assert calls == []
