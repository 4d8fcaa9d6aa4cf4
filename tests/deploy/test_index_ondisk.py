"""On-disk inverted lists (issue 22, item 3) and memory-mapped loading (item 4).

The on-disk index must search exactly like the in-memory IVF index built from the same rows with the same
trained quantiser (ids and distances), through builds, appends, removals and re-embedded files, and its
committed lists file must never change under a reader. Loaded indexes are mapped from their files, and two
processes that load the same index share its pages.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image
from torch import nn

from raml.deploy import IndexDirectoryError, IndexParams, index_images, load_index
from raml.deploy.faiss_index import add_with_ids, empty_faiss_index
from raml.deploy.ondisk_ivf import build_ondisk_ivf, extend_ondisk_ivf, is_ondisk, set_lists_name
from raml.deploy.shards import ShardPlan

DIM = 32
SHA = "0" * 64


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def trained(index_type: str, rows: np.ndarray) -> faiss.Index:
    params = IndexParams(index_type=index_type, nlist=16, m=8, nbits=6).resolve(len(rows), DIM)
    index = empty_faiss_index(params, DIM)
    index.train(rows)
    return index


def search(index: faiss.Index, queries: np.ndarray, nprobe: int, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index.search(queries, k)


def write_and_read(index: faiss.Index, folder: Path, lists: Path) -> faiss.Index:
    """Write an on-disk index next to its lists file and read it back as a reader does."""
    set_lists_name(index, lists.name)
    faiss.write_index(index, str(folder / "index.faiss"))
    return faiss.read_index(str(folder / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


@pytest.mark.parametrize("index_type", ["ivf", "ivfpq"])
def test_merged_on_disk_lists_search_like_the_in_memory_index(tmp_path, index_type):
    rows = unit_rows(3000, 0)
    ids = np.random.default_rng(1).permutation(10_000)[:3000].astype(np.int64)  # ids are not positions
    template = trained(index_type, rows[:1000])
    in_memory = faiss.clone_index(template)
    add_with_ids(in_memory, rows, ids)
    chunks = [(rows[s : s + 700], ids[s : s + 700]) for s in range(0, 3000, 700)]
    built = build_ondisk_ivf(template, chunks, tmp_path / "lists.ivfdata", tmp_path / "parts", part_rows=1000)
    assert is_ondisk(built) and built.ntotal == 3000
    assert not any((tmp_path / "parts").iterdir())  # the per-chunk parts are removed
    loaded = write_and_read(built, tmp_path, tmp_path / "lists.ivfdata")
    assert is_ondisk(loaded)
    queries = unit_rows(50, 2)
    for nprobe in (3, 16):
        expected, got = search(in_memory, queries, nprobe), search(loaded, queries, nprobe)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])

    # the next version: some ids removed, others re-added with new vectors, new ones added; the old file untouched
    before = (tmp_path / "lists.ivfdata").read_bytes()
    removed = ids[::7]
    again = ids[1::11]
    new_rows = unit_rows(400 + len(again), 3)
    new_ids = np.concatenate([again, np.arange(20_000, 20_400)]).astype(np.int64)
    outdated = np.union1d(removed, again)
    in_memory.remove_ids(faiss.IDSelectorBatch(outdated))
    add_with_ids(in_memory, new_rows, new_ids)
    extended = extend_ondisk_ivf(
        loaded,
        outdated,
        [(new_rows[:200], new_ids[:200]), (new_rows[200:], new_ids[200:])],
        tmp_path / "lists2.ivfdata",
        tmp_path / "parts",
        part_rows=500,  # several parts of kept lists
    )
    (tmp_path / "next").mkdir()
    (tmp_path / "lists2.ivfdata").rename(tmp_path / "next" / "lists2.ivfdata")
    extended = write_and_read(extended, tmp_path / "next", tmp_path / "next" / "lists2.ivfdata")
    assert (tmp_path / "lists.ivfdata").read_bytes() == before
    assert extended.ntotal == in_memory.ntotal == 3000 - len(outdated) + len(new_ids)
    for nprobe in (3, 16):
        expected, got = search(in_memory, queries, nprobe), search(extended, queries, nprobe)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])
    assert not np.isin(search(extended, new_rows[:50], 16)[1], np.setdiff1d(removed, again)).any()


# ----------------------------------------------------------------------------------------- through index_images


def fake_rows(paths: list[str]) -> np.ndarray:
    """Deterministic unit rows from each file's path and content (a changed file gets a new row)."""
    out = []
    for path in paths:
        seed = int.from_bytes(hashlib.sha256(path.encode() + Path(path).read_bytes()).digest()[:8], "little")
        x = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
        out.append(x / np.linalg.norm(x))
    return np.stack(out)


def fake_engine(plan: ShardPlan) -> dict:
    for i in plan.missing():
        plan.write(i, fake_rows(plan.shard_paths(i)))
    return {"engine": "fake"}


def tiny_bmp() -> bytes:
    """A 1x1 BMP: the files pass raml index's header check (--bad-images); bytes after it make each one unique."""
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, format="BMP")
    return out.getvalue()


def make_files(folder: Path, count: int, start: int = 0) -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = []
    header = tiny_bmp()
    for i in range(start, start + count):
        path = folder / f"img{i:05d}.bmp"
        path.write_bytes(header + f"image {i}".encode())
        paths.append(str(path))
    return paths


def build(index_dir: Path, paths: list[str], on_disk: bool | None, remove: list[str] = ()) -> dict:
    params = None if on_disk is None else IndexParams("ivfpq", nlist=16, m=8, nbits=6, train_size=800, on_disk=on_disk)
    return index_images(
        nn.Identity(), paths, 32, index_dir, SHA, params=params, remove=remove, shard_size=300, engine=fake_engine
    )


def assert_same_results(a, b, queries: np.ndarray) -> None:
    for nprobe in (2, 16):
        sa, ia = a.search(queries, 25, nprobe=nprobe)
        sb, ib = b.search(queries, 25, nprobe=nprobe)
        np.testing.assert_array_equal(ib, ia)
        np.testing.assert_array_equal(sb, sa)


def mapped_files() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if len(line.split()) >= 6}


def test_raml_index_on_disk_equals_the_in_memory_index_through_its_life_cycle(tmp_path):
    images = tmp_path / "images"
    paths = make_files(images, 1500)
    memory_dir, disk_dir = tmp_path / "memory", tmp_path / "disk"
    build(memory_dir, paths, on_disk=False)
    build(disk_dir, paths, on_disk=True)
    memory, disk = load_index(memory_dir), load_index(disk_dir)
    assert disk.params.on_disk and is_ondisk(disk.index) and not is_ondisk(memory.index)
    assert disk.meta["files"]["invlists"] == "invlists-000001.ivfdata" and disk.meta["version"] == 3
    assert "invlists" not in memory.meta["files"] and memory.meta["version"] == 2
    assert str(disk_dir / "invlists-000001.ivfdata") in mapped_files()
    centroids = [faiss.extract_index_ivf(x.index).quantizer.reconstruct_n(0, 16) for x in (memory, disk)]
    np.testing.assert_array_equal(centroids[0], centroids[1])  # the same trained quantiser
    queries = fake_rows(paths[:40])
    assert_same_results(memory, disk, queries)
    results_gen1 = disk.search(queries, 25, nprobe=16)

    # an update: 100 removed, 3 files changed (re-embedded under their ids), 400 appended; the mapped
    # generation 1 keeps answering as before (its lists file is replaced, never modified)
    for path in paths[200:203]:
        Path(path).write_bytes(Path(path).read_bytes() + b" changed")
    more = paths + make_files(images, 400, start=1500)
    removed = paths[500:600]
    for index_dir in (memory_dir, disk_dir):
        summary = build(index_dir, more, on_disk=None, remove=removed)
        assert (summary["added"], summary["reembedded"], summary["removed"]) == (400, 3, 100)
    memory2, disk2 = load_index(memory_dir), load_index(disk_dir)
    assert is_ondisk(disk2.index) and disk2.live_count == 1800 and disk2.generation == 2
    assert sorted(p.name for p in disk_dir.glob("invlists-*")) == ["invlists-000002.ivfdata"]
    assert_same_results(memory2, disk2, np.concatenate([queries, fake_rows(more[198:205])]))
    _, found = disk2.search(fake_rows(removed), 25, nprobe=16)
    assert not np.isin(found, np.arange(500, 600)).any()  # removals honoured
    np.testing.assert_array_equal(disk.search(queries, 25, nprobe=16)[1], results_gen1[1])

    # removal only
    for index_dir in (memory_dir, disk_dir):
        build(index_dir, [], on_disk=None, remove=paths[:50])
    assert_same_results(load_index(memory_dir), load_index(disk_dir), queries)
    leftovers = [p.name for p in disk_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_on_disk_needs_an_ivf_index_type():
    with pytest.raises(ValueError, match="only ivf and ivfpq"):
        IndexParams("flat", on_disk=True)
    with pytest.raises(ValueError, match="only ivf and ivfpq"):
        IndexParams("hnsw", on_disk=True)


def test_a_missing_lists_file_is_a_clear_error(tmp_path):
    paths = make_files(tmp_path / "images", 900)
    build(tmp_path / "disk", paths, on_disk=True)
    (tmp_path / "disk" / "invlists-000001.ivfdata").unlink()
    with pytest.raises(ValueError, match="invlists-000001.ivfdata .*is missing"):
        load_index(tmp_path / "disk")


# ----------------------------------------------------------------------------------------- memory-mapped loading


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "ivfpq"])
def test_a_loaded_index_is_mapped_from_its_file_and_a_writer_reads_it(tmp_path, index_type):
    paths = make_files(tmp_path / "images", 900)
    params = IndexParams(index_type, nlist=8, m=8, nbits=6)
    index_images(nn.Identity(), paths, 32, tmp_path / "index", SHA, params=params, engine=fake_engine)
    mapped = load_index(tmp_path / "index")
    faiss_file = str(tmp_path / "index" / mapped.meta["files"]["index"])
    assert faiss_file in mapped_files()
    read = load_index(tmp_path / "index", mmap=False)  # what a writer loads: a copy it may modify
    assert faiss_file in mapped_files()
    queries = fake_rows(paths[:10])
    assert_same_results(read, mapped, queries)
    del mapped
    assert faiss_file not in mapped_files()
    del read


def serve_mapped(index_dir: str, ready, done) -> None:
    """A reader process: load the index, read every code (every page touched), wait."""
    index = load_index(index_dir)
    queries = np.eye(index.dim, dtype=np.float32)
    index.search(queries, index.live_count, nprobe=index.params.nlist)
    ready.set()
    done.wait(60)


def mapping_rss_pss(pid: int, path: str) -> tuple[int, int]:
    """Resident and proportional (shared pages divided by their number of mappers) KiB of ``path`` in ``pid``."""
    rss = pss = 0
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and fields[0][0] in "0123456789abcdef":
            current = len(fields) >= 6 and fields[-1] == path
        elif current and fields[0] == "Rss:":
            rss += int(fields[1])
        elif current and fields[0] == "Pss:":
            pss += int(fields[1])
    return rss, pss


@pytest.mark.parametrize("on_disk", [False, True])
def test_two_processes_loading_the_same_index_share_its_pages(tmp_path, on_disk):
    paths = make_files(tmp_path / "images", 3000)
    params = IndexParams("ivf", nlist=8, on_disk=on_disk)
    index_images(nn.Identity(), paths, 32, tmp_path / "index", SHA, params=params, engine=fake_engine)
    meta = load_index(tmp_path / "index").meta
    shared = str(tmp_path / "index" / meta["files"]["invlists" if on_disk else "index"])
    context = multiprocessing.get_context("fork")  # a forked reader starts in milliseconds
    done = context.Event()
    ready = [context.Event(), context.Event()]
    readers = [context.Process(target=serve_mapped, args=(str(tmp_path / "index"), r, done)) for r in ready]
    try:
        for reader in readers:
            reader.start()
        assert all(r.wait(60) for r in ready), "a reader did not load the index within 60 s"
        figures = [mapping_rss_pss(reader.pid, shared) for reader in readers]
    finally:
        done.set()
        for reader in readers:
            reader.join(30)
    size_kib = Path(shared).stat().st_size / 1024
    for rss, pss in figures:
        assert rss >= 0.5 * size_kib  # the file is mapped and resident, not copied into the process
        assert pss <= 0.55 * rss  # each resident page is counted once for two processes: shared


def test_the_cli_refuses_on_disk_for_a_flat_index_before_anything_is_read(tmp_path, capsys):
    from raml.cli import main as cli_main

    argv = ["index", "--network-path", str(tmp_path / "absent.pth"), "--images", str(tmp_path)]
    argv += ["--output", str(tmp_path / "index"), "--on-disk", "--index-type", "flat"]
    assert cli_main.main(argv) == 2
    assert "only ivf and ivfpq" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()


def test_a_crash_before_the_commit_leaves_the_on_disk_index_intact(tmp_path):
    paths = make_files(tmp_path / "images", 900)
    index_dir = tmp_path / "disk"
    build(index_dir, paths[:800], on_disk=True)

    def snapshot() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(index_dir.iterdir()) if p.is_file()}

    before = snapshot()

    def crash() -> None:
        raise KeyboardInterrupt("simulated crash before the commit")

    with pytest.raises(KeyboardInterrupt):
        index_images(
            nn.Identity(), paths, 32, index_dir, SHA, remove=paths[:5], before_commit=crash, engine=fake_engine
        )
    assert snapshot() == before  # no lists file of generation 2, no temporary file or parts folder left
    assert sorted(p.name for p in index_dir.iterdir() if p.is_dir()) == [
        p.name for p in index_dir.glob("shards-*")
    ]  # only the resumable shards of the interrupted run
    assert load_index(index_dir).live_count == 800
    summary = index_images(nn.Identity(), paths, 32, index_dir, SHA, remove=paths[:5], engine=fake_engine)
    assert (summary["added"], summary["removed"], summary["generation"]) == (100, 5, 2)
    assert sorted(p.name for p in index_dir.iterdir() if p.name.startswith(("invlists", "."))) == [
        "invlists-000002.ivfdata"
    ]


# ----------------------------------------------------------------------------------------- damaged or crafted folders


@pytest.mark.parametrize("cut", ["all", "tail"])
def test_a_truncated_lists_file_is_a_clear_error_before_faiss_reads_it(tmp_path, cut):
    paths = make_files(tmp_path / "images", 900)
    index_dir = tmp_path / "disk"
    build(index_dir, paths, on_disk=True)
    lists = index_dir / "invlists-000001.ivfdata"
    complete = lists.read_bytes()
    full = len(complete)
    kept = 0 if cut == "all" else full - 100
    os.truncate(lists, kept)
    # loading maps the file; without the check a search would die of SIGBUS (or return garbage): none is run
    with pytest.raises(
        IndexDirectoryError,
        match=rf"ivfdata is truncated: .*need {full} bytes, the file has {kept}\b.*`raml index --overwrite`",
    ):
        load_index(index_dir)
    assert lists.stat().st_size == kept and (index_dir / "index.json").is_file()  # nothing else touched
    lists.write_bytes(complete)  # the other fix the message gives: the complete file copied again
    assert load_index(index_dir).live_count == 900


def _edit_files_entry(index_dir: Path, kind: str, name: str) -> None:
    meta = json.loads((index_dir / "index.json").read_text())
    meta["files"][kind] = name
    (index_dir / "index.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("paths", "/etc/passwd"),
        ("paths", "../outside/paths-000001.json"),
        ("embeddings", "sub/embeddings-000001.npy"),
        ("labels", "labels-000001.npy/.."),
        ("index", "paths-000001.json"),
        ("stamps", 7),
    ],
)
def test_an_index_json_naming_a_file_outside_the_folder_is_refused(tmp_path, kind, name):
    index_dir = tmp_path / "index"
    build(index_dir, make_files(tmp_path / "images", 5), on_disk=None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "paths-000001.json").write_text(json.dumps(["/secret"] * 5))
    _edit_files_entry(index_dir, kind, name)
    with pytest.raises(
        IndexDirectoryError,
        match=rf"names the '{kind}' file .*expected a file of this folder named '{kind}-<generation>",
    ):
        load_index(index_dir)


def test_a_symlinked_index_file_is_refused(tmp_path):
    index_dir = tmp_path / "index"
    build(index_dir, make_files(tmp_path / "images", 5), on_disk=None)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps(["/secret"] * 5))
    (index_dir / "paths-000001.json").unlink()
    (index_dir / "paths-000001.json").symlink_to(secret)
    with pytest.raises(
        IndexDirectoryError, match=r"paths-000001.json is a symbolic link; .*copy the folder with `cp -rL`"
    ):
        load_index(index_dir)
    assert json.loads(secret.read_text()) == ["/secret"] * 5
