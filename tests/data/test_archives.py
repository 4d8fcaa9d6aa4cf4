"""Safe unpacking: the layouts of the README's tar/unzip commands, and refusal of members that would escape."""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from raml.data import archives
from raml.data.archives import ArchiveError, PlainFile, TarArchive, ZipArchive, safe_member_name


def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    # gzip's level 6 (zlib's and the gzip tool's default; tarfile's is 9): 4 MB of 4-letter bytes in 0.4 CPU s,
    # not 2.4, and about as small (3.4 against 3.5 times)
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


MEMBERS = {
    "attributes.txt": b"top-level file beside the folder\n",
    "CUB_200_2011/images.txt": b"1 001.A/a.jpg\n",
    "CUB_200_2011/images/001.A/a.jpg": b"jpeg bytes",
}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a/b.jpg", "a/b.jpg"), ("./a//b.jpg", "a/b.jpg"), ("a/./b/", "a/b"), ("a\\b.jpg", "a/b.jpg")],
)
def test_member_names_are_normalised(name, expected):
    assert safe_member_name(name, Path("x.tar")) == expected


@pytest.mark.parametrize("name", ["/etc/passwd", "\\evil", "C:evil", "a/../../evil", "..", "a/..\\..\\evil"])
def test_escaping_member_names_are_refused(name):
    with pytest.raises(ArchiveError, match="x.tar"):
        safe_member_name(name, Path("x.tar"))


def test_strip_components_matches_gnu_tar(tmp_path: Path):
    archive = _tar(tmp_path / "CUB_200_2011.tgz", MEMBERS)
    ours = tmp_path / "ours"
    assert TarArchive(strip_components=1).unpack(archive, ours) == 2
    assert _files(ours) == {"images.txt": b"1 001.A/a.jpg\n", "images/001.A/a.jpg": b"jpeg bytes"}
    if shutil.which("tar") is None:
        pytest.skip("no tar command to compare with")
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(gnu), "--strip-components=1"], check=True)
    assert _files(gnu) == _files(ours)


def test_zip_prefix_is_removed_like_the_readme_symlink_trick(tmp_path: Path):
    archive = tmp_path / "Stanford_Online_Products.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("Stanford_Online_Products/", b"")
        z.writestr("Stanford_Online_Products/Ebay_test.txt", b"header\n")
        z.writestr("Stanford_Online_Products/chair_final/1.JPG", b"jpeg")
        z.writestr("README_outside.txt", b"kept as it is")
    ours = tmp_path / "ours"
    assert ZipArchive(strip_prefix="Stanford_Online_Products/").unpack(archive, ours) == 3
    expected = {"Ebay_test.txt": b"header\n", "chair_final/1.JPG": b"jpeg", "README_outside.txt": b"kept as it is"}
    assert _files(ours) == expected
    if shutil.which("unzip") is None:
        return
    readme = tmp_path / "readme"
    readme.mkdir()
    (readme / "Stanford_Online_Products").symlink_to(".")
    subprocess.run(["unzip", "-q", str(archive)], cwd=readme, check=True)
    (readme / "Stanford_Online_Products").unlink()
    assert _files(readme) == _files(ours)


def test_tar_member_climbing_out_is_refused_and_nothing_escapes(tmp_path: Path):
    archive = _tar(tmp_path / "evil.tgz", {"CUB_200_2011/ok.txt": b"ok", "CUB_200_2011/../../escaped.txt": b"x"})
    dest = tmp_path / "a" / "b"
    with pytest.raises(ArchiveError, match=r"climbs out"):
        TarArchive(strip_components=1).unpack(archive, dest)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_tar_absolute_member_is_refused(tmp_path: Path):
    archive = _tar(tmp_path / "abs.tgz", {"/tmp/raml-absolute-member.txt": b"x"})
    with pytest.raises(ArchiveError, match="absolute path"):
        TarArchive().unpack(archive, tmp_path / "dest")
    assert not Path("/tmp/raml-absolute-member.txt").exists()


def test_tar_symlink_pointing_out_is_refused(tmp_path: Path):
    archive = _tar(tmp_path / "link.tgz", {}, links={"car_ims/escape": "../../outside"})
    with pytest.raises(ArchiveError, match="car_ims/escape"):
        TarArchive().unpack(archive, tmp_path / "dest")
    assert not (tmp_path / "dest" / "car_ims" / "escape").is_symlink()


@pytest.mark.parametrize(
    ("name", "message"), [("../evil.txt", "climbs out"), ("/abs.txt", "absolute path"), ("link", "symbolic link")]
)
def test_unsafe_zip_members_are_refused_before_anything_is_written(tmp_path: Path, name: str, message: str):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("Stanford_Online_Products/first.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if name == "link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, b"../../outside")
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match=message):
        ZipArchive(strip_prefix="Stanford_Online_Products/").unpack(archive, dest)
    assert not dest.exists()  # every name is checked before the first file is written


def test_truncated_archives_are_reported_as_damaged(tmp_path: Path):
    big = {f"car_ims/{i:06d}.jpg": bytes(range(256)) * 64 for i in range(20)}
    tgz = _tar(tmp_path / "car_ims.tgz", big)
    tgz.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    with pytest.raises(ArchiveError, match=r"car_ims.tgz is damaged"):
        TarArchive().unpack(tgz, tmp_path / "dest")
    archive = tmp_path / "sop.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", b"x" * 5000)
    archive.write_bytes(archive.read_bytes()[:-30])
    with pytest.raises(ArchiveError, match=r"sop.zip is damaged"):
        ZipArchive().unpack(archive, tmp_path / "dest2")


def test_a_plain_file_is_copied(tmp_path: Path):
    plain = tmp_path / "cars_annos.mat"
    plain.write_bytes(b"matlab")
    assert PlainFile().unpack(plain, tmp_path / "cars") == 1
    assert (tmp_path / "cars" / "cars_annos.mat").read_bytes() == b"matlab"


# ------------------------------------------------------------------------------------------ issue 18, item 1
def _outside(box: Path, dest: Path, *keep: Path) -> list[str]:
    """Every file or link under ``box`` that is neither in ``dest`` nor one of ``keep``."""
    return sorted(
        str(p.relative_to(box))
        for p in box.rglob("*")
        if (p.is_file() or p.is_symlink()) and dest not in p.parents and p not in keep
    )


def test_symlink_chain_archive_is_refused_and_nothing_lands_outside(tmp_path: Path, symlink_chain_tgz: bytes):
    """The CVE-2025-4517 pattern (the ``symlink_chain_tgz`` fixture of tests/data/conftest.py)."""
    box = tmp_path / "box"
    box.mkdir()
    archive = box / "car_ims.tgz"
    archive.write_bytes(symlink_chain_tgz)
    dest = box / "dest"
    with pytest.raises(ArchiveError, match=r"member 'a' is a symbolic link"):
        TarArchive().unpack(archive, dest)
    assert _outside(box, dest, archive) == []
    assert not dest.exists() or not any(dest.iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    ("kind", "word"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
    ],
)
def test_tar_members_other_than_files_and_folders_are_refused_before_anything_is_written(tmp_path, kind, word):
    archive = tmp_path / "x.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        first = tarfile.TarInfo("car_ims/000001.jpg")
        first.size = 4
        tar.addfile(first, io.BytesIO(b"jpeg"))
        odd = tarfile.TarInfo("car_ims/odd")
        odd.type, odd.linkname = kind, "car_ims/000001.jpg"  # a harmless target: refused all the same
        tar.addfile(odd)
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match=r"member 'car_ims/odd' is a") as refused:
        TarArchive().unpack(archive, dest)
    assert not dest.exists() or not any(dest.iterdir())  # not even the regular file before it
    assert word in str(refused.value)


@pytest.mark.parametrize(("mode", "word"), [(stat.S_IFIFO, "FIFO"), (stat.S_IFCHR, "character device")])
def test_zip_members_with_a_special_unix_mode_are_refused(tmp_path, mode, word):
    archive = tmp_path / "sop.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("first.txt", b"fine")
        info = zipfile.ZipInfo("pipe")
        info.create_system, info.external_attr = 3, (mode | 0o644) << 16
        z.writestr(info, b"")
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match=rf"member 'pipe' is a {word}"):
        ZipArchive().unpack(archive, dest)
    assert not dest.exists()


# ------------------------------------------------------------------------------------------ issue 18, item 2
def _forge_gzip_trailer(path: Path, claimed: int) -> None:
    """Overwrite the gzip ISIZE field (the last 4 bytes: unpacked size modulo 2**32) with ``claimed``."""
    data = bytearray(path.read_bytes())
    data[-4:] = claimed.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def _acgt(n: int, seed: int = 0) -> bytes:
    """``n`` bytes over a 4-letter alphabet: gzip shrinks them about 3.5 times (like a poorly compressible file)."""
    return random.Random(seed).randbytes(n).translate(bytes(b"ACGT"[i % 4] for i in range(256)))


def _nothing_in(dest: Path) -> bool:
    return not dest.exists() or not any(dest.iterdir())


def test_a_forged_gzip_trailer_does_not_hide_a_bomb(tmp_path: Path):
    archive = _tar(tmp_path / "car_ims.tgz", {"car_ims/zeros.bin": bytes(16 << 20)})
    _forge_gzip_trailer(archive, 65_321)
    with gzip.open(archive) as f:  # a valid gzip stream; only the trailer lies (gzip checks it at the very end)
        assert len(f.read(16 << 20)) == 16 << 20
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match=r"--max-unpack-ratio") as refused:
        TarArchive().unpack(archive, dest)
    assert "car_ims.tgz" in str(refused.value)
    assert _nothing_in(dest)


def test_unpacking_past_the_free_space_is_refused_before_writing(tmp_path: Path, monkeypatch):
    content = _acgt(4 << 20)
    archive = _tar(tmp_path / "car_ims.tgz", {"car_ims/a.bin": content})
    _forge_gzip_trailer(archive, 1000)
    assert archive.stat().st_size < 2 << 20 < len(content)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=2 << 20))
    dest = tmp_path / "dest"
    with pytest.raises(OSError, match=r"Not enough free space .*unpacking car_ims.tgz"):
        TarArchive().unpack(archive, dest)
    assert _nothing_in(dest)


def test_free_space_is_watched_while_unpacking_and_a_stop_leaves_nothing(tmp_path: Path, monkeypatch):
    members = {f"car_ims/{i:06d}.jpg": _acgt(100_000, seed=i) for i in range(3)}
    archive = _tar(tmp_path / "car_ims.tgz", members)
    dest = tmp_path / "dest"
    usage = shutil.disk_usage(tmp_path)

    def disk_filling_up(_: object) -> object:  # another program fills the disk once the first image is written
        written = dest.exists() and any(p.is_file() for p in dest.rglob("*"))
        return usage._replace(free=150_000 if written else 1 << 40)

    monkeypatch.setattr(shutil, "disk_usage", disk_filling_up)
    with pytest.raises(OSError, match=r"free space .*fell") as stopped:
        TarArchive().unpack(archive, dest)
    assert "car_ims.tgz" in str(stopped.value)
    assert _nothing_in(dest)  # the image already written is removed too
    monkeypatch.undo()
    assert TarArchive().unpack(archive, dest) == 3  # with the space back, the same archive unpacks


def test_the_unpack_ratio_is_a_setting(tmp_path: Path):
    content = _acgt(3 << 20)  # gzip: about 3.5 times smaller
    archive = _tar(tmp_path / "car_ims.tgz", {"car_ims/a.bin": content})
    with pytest.raises(ArchiveError, match=r"more than 2 times"):
        TarArchive().unpack(archive, tmp_path / "narrow", max_ratio=2)
    assert _nothing_in(tmp_path / "narrow")
    assert TarArchive().unpack(archive, tmp_path / "wide", max_ratio=5) == 1
    assert (tmp_path / "wide" / "car_ims" / "a.bin").read_bytes() == content


# ------------------------------------------------------------------------ empty files and folders (audit)
def _kept(dest: Path) -> None:
    """A file that was in the dataset folder before: an unpacking refused later must leave it alone."""
    dest.mkdir()
    (dest / "kept.txt").write_bytes(b"downloaded earlier")


@pytest.fixture
def no_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails a test whose archive reaches the writing pass: the limits must refuse it in the first one."""

    def writer(*_: object) -> None:
        raise AssertionError("the archive should have been refused before anything was written")

    monkeypatch.setattr(archives, "_Writer", writer)


def test_empty_folders_count_toward_the_unpack_ratio_and_nothing_already_there_is_lost(
    tmp_path: Path, no_writing, monkeypatch
):
    # 400 folders gzip to a few KB but take 400 blocks and inodes: past the 1 MiB grace and 20x the archive
    monkeypatch.setattr(archives, "RATIO_FREE_MEMBERS", 100)  # not 4,096: a small archive for a fast test
    archive = tmp_path / "car_ims.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(400):
            info = tarfile.TarInfo(f"car_ims/{i:06d}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
    assert archive.stat().st_size * archives.MAX_UNPACK_RATIO < archives.UNPACK_GRACE_BYTES < 400 * 4096
    dest = tmp_path / "dest"
    _kept(dest)
    with pytest.raises(ArchiveError, match=r"each file and folder counted as 4\.0 KiB .*--max-unpack-ratio"):
        TarArchive().unpack(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["kept.txt"]  # refused before the first folder
    assert (dest / "kept.txt").read_bytes() == b"downloaded earlier"


def test_empty_zip_files_count_toward_the_free_space(tmp_path: Path, monkeypatch, no_writing):
    archive = tmp_path / "sop.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(20):
            z.writestr(f"chair_final/{i}.JPG", b"")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=20 * 4096))  # not room for 21 entries
    dest = tmp_path / "dest"
    _kept(dest)
    with pytest.raises(OSError, match=r"Not enough free space .*sop.zip: its members take 84.0 KiB"):
        ZipArchive().unpack(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["kept.txt"]


def test_deep_paths_are_charged_for_every_folder_they_create(tmp_path: Path, no_writing, monkeypatch):
    monkeypatch.setattr(archives, "RATIO_FREE_MEMBERS", 100)
    # 16 files, each under 40 folders of its own: 656 entries from one small archive, refused before writing
    deep = "/".join(["d"] * 40)
    archive = _tar(tmp_path / "car_ims.tgz", {f"x{i}/{deep}/f.jpg": b"" for i in range(16)})
    dest = tmp_path / "dest"
    _kept(dest)
    with pytest.raises(ArchiveError, match=r"--max-unpack-ratio"):
        TarArchive().unpack(archive, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["kept.txt"]


def test_a_small_archive_of_many_tiny_files_is_not_a_bomb(tmp_path: Path):
    # 200 class folders x 2 tiny images (the test fixtures' datasets): 600 entries, 2.3 MiB charged, from ~40 KB
    archive = _tar(
        tmp_path / "CUB.tgz", {f"images/{k:03d}.A/{j}.jpg": _acgt(60, k * 2 + j) for k in range(200) for j in range(2)}
    )
    assert archive.stat().st_size * archives.MAX_UNPACK_RATIO < 600 * archives.MEMBER_BYTES
    assert TarArchive().unpack(archive, tmp_path / "dest") == 400


@pytest.mark.parametrize("seed", range(5))
def test_the_plan_charges_at_least_what_is_written(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    names = sorted({"/".join(rng.choices("ab", k=rng.randint(1, 4))) + ".jpg" for _ in range(30)})
    rng.shuffle(names)  # any order: the members after a member need not share its folders
    folders = ["a", "b/a"]  # folder members too, one of them already made by a file before it
    archive = tmp_path / "x.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in names + folders:
            info = tarfile.TarInfo(name)
            if name in folders:
                info.type = tarfile.DIRTYPE
            tar.addfile(info)
    budget = archives._Budget(archive, tmp_path / "dest", max_ratio=1e9)
    with tarfile.open(archive) as tar:
        for member in tar:
            budget.plan(0, member.name, folder=member.isdir())
    writer = archives._Writer(archive, tmp_path / "dest", budget)
    for name in names:
        writer.file(name, io.BytesIO(b""))
    for name in folders:
        writer.directory(name)
    entries = sum(1 for _ in (tmp_path / "dest").rglob("*"))
    assert budget.written == entries * archives.MEMBER_BYTES  # every created file and folder, once
    assert budget.planned >= budget.written


def _sparse_tar(path: Path, pax: bool) -> Path:
    """A tar whose second member is a sparse file: PAX format (a regular member with GNU.sparse.* headers, as
    GNU ``tar --sparse --format=pax`` writes) or old GNU format (member type 'S')."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT) as tar:
        first = tarfile.TarInfo("sp/a.jpg")
        first.size = 4
        tar.addfile(first, io.BytesIO(b"jpeg"))
        hole = tarfile.TarInfo("sp/hole.bin")
        hole.size = 4
        if pax:
            hole.pax_headers = {"GNU.sparse.map": "1048572,4", "GNU.sparse.realsize": str(1 << 20)}
        else:
            hole.type = tarfile.GNUTYPE_SPARSE
        tar.addfile(hole, io.BytesIO(b"data"))
    return path


@pytest.mark.parametrize("pax", [True, False], ids=["pax", "gnu"])
def test_sparse_members_are_refused_in_both_formats(tmp_path: Path, pax: bool, no_writing):
    archive = _sparse_tar(tmp_path / "sp.tgz", pax)
    with tarfile.open(archive) as tar:
        assert tar.getmember("sp/hole.bin").issparse()
    dest = tmp_path / "dest"
    _kept(dest)
    with pytest.raises(ArchiveError, match=r"member 'sp/hole.bin' is a sparse file; .*regular files and folders"):
        TarArchive().unpack(archive, dest, max_ratio=1e9)
    assert sorted(p.name for p in dest.iterdir()) == ["kept.txt"]  # not even the regular file before it


# ------------------------------------------------------------------ repeated members, unwritten bytes (audit)
def _repeated_folder(path: Path, depth: int, times: int) -> Path:
    """A .tgz of one folder ``a/a/.../a`` (``depth`` levels) listed ``times`` times."""
    info = tarfile.TarInfo("/".join(["a"] * depth))
    info.type = tarfile.DIRTYPE
    header = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    with gzip.open(path, "wb", compresslevel=6) as out:
        out.write(header * times + b"\0" * 1024)
    return path


def test_a_deep_folder_repeated_is_checked_once(tmp_path: Path, monkeypatch):
    # before: every member lstat'ed every level of its path and resolved it again (21.6 ms a member at depth 500)
    archive = _repeated_folder(tmp_path / "car_ims.tgz", depth=100, times=200)
    calls = []
    lstat = os.lstat

    def counted(path, *args, **kwargs):
        calls.append(path)
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", counted)
    assert TarArchive().unpack(archive, tmp_path / "dest") == 0
    monkeypatch.setattr(os, "lstat", lstat)
    assert (tmp_path / "dest" / "/".join(["a"] * 100)).is_dir()
    assert len(calls) < 4 * 100  # each level checked and resolved once, not once a member (40,000 calls)


def test_repeated_members_count_against_the_unpack_ratio(tmp_path: Path, monkeypatch, no_writing):
    # before: a folder already on the previous member's path cost nothing, so the repeats were free
    monkeypatch.setattr(archives, "RATIO_FREE_MEMBERS", 0)
    archive = _repeated_folder(tmp_path / "car_ims.tgz", depth=100, times=1500)
    assert 100 * archives.MEMBER_BYTES < archives.UNPACK_GRACE_BYTES  # the folders alone pass
    with pytest.raises(ArchiveError, match=r"--max-unpack-ratio"):
        TarArchive().unpack(archive, tmp_path / "dest")


def test_the_data_of_skipped_members_counts_against_the_unpack_ratio(tmp_path: Path, no_writing):
    # before: a member skipped by --strip-components was charged nothing, though decompressed (twice): 2 GiB of
    # zeros from a 2 MB .tgz were accepted; here 40 MiB of zeros, past the 18 MiB the stream may hold
    archive = tmp_path / "CUB_200_2011.tgz"
    skipped = tarfile.TarInfo("attributes.txt")  # one component: skipped by strip_components=1
    skipped.size = 40 << 20
    kept = tarfile.TarInfo("CUB_200_2011/images.txt")
    kept.size = 3
    with gzip.open(archive, "wb", compresslevel=1) as out:
        out.write(skipped.tobuf(tarfile.GNU_FORMAT))
        for _ in range(40):
            out.write(bytes(1 << 20))
        out.write(kept.tobuf(tarfile.GNU_FORMAT) + b"1 a".ljust(512, b"\0") + bytes(1024))
    with pytest.raises(ArchiveError, match=r"decompressed stream runs past .*--max-unpack-ratio"):
        TarArchive(strip_components=1).unpack(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_pax_headers_count_against_the_unpack_ratio(tmp_path: Path, no_writing):
    # before: header bytes were never charged: 2,000 members with a 1 MB PAX comment each (1.87 GiB) were accepted
    info = tarfile.TarInfo("car_ims")
    info.type = tarfile.DIRTYPE
    info.pax_headers = {"comment": "a" * 1_000_000}
    header = info.tobuf(tarfile.PAX_FORMAT)
    archive = tmp_path / "car_ims.tgz"
    with gzip.open(archive, "wb", compresslevel=1) as out:
        for _ in range(30):
            out.write(header)
        out.write(bytes(1024))
    with pytest.raises(ArchiveError, match=r"--max-unpack-ratio"):
        TarArchive().unpack(archive, tmp_path / "dest")


def _pax_chain(count: int, payload: int) -> bytes:
    """``count`` PAX extended headers in a row (each ``payload`` bytes of comment), as tarfile reads them: all
    within one ``next()``, before the member they would describe."""
    body = "comment=" + "a" * payload + "\n"
    length = len(body) + 1
    length = len(f"{length} {body}")
    length = len(f"{length} {body}")
    record = f"{length} {body}".encode()
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = len(record)
    return (header.tobuf(tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512)) * count


@pytest.mark.parametrize(("count", "payload"), [(40, 1_000_000), (1500, 10)])
def test_a_chain_of_extended_headers_is_refused_while_it_is_read(
    tmp_path: Path, count: int, payload: int, no_writing, monkeypatch: pytest.MonkeyPatch
):
    # before: the stream check ran once per member, after tarfile had read the whole chain (40 MB here, 190 MiB
    # held for 200 in the review); a chain thousands long ended in a RecursionError traceback
    member = tarfile.TarInfo("car_ims/000001.jpg")
    member.size = 3
    archive = tmp_path / "car_ims.tgz"
    with gzip.open(archive, "wb", compresslevel=1) as out:
        out.write(_pax_chain(count, payload) + member.tobuf(tarfile.USTAR_FORMAT) + b"abc".ljust(512, b"\0"))
        out.write(bytes(1024))
    positions: list[int] = []
    real_read_to = archives._Budget.read_to

    def recording(self, position: int) -> None:  # noqa: ANN001
        positions.append(position)
        real_read_to(self, position)

    monkeypatch.setattr(archives._Budget, "read_to", recording)
    with pytest.raises(ArchiveError, match=r"--max-unpack-ratio|chain of thousands of extended headers"):
        TarArchive().unpack(archive, tmp_path / "dest")
    assert max(positions, default=0) < 30 << 20  # refused while the chain was read (~21 MB), not after its 40 MB


@pytest.mark.parametrize("cut", [512 + 10240, 2 * (512 + 10240), 2 * (512 + 10240) + 100])
def test_a_plain_tar_cut_at_a_member_boundary_is_damaged(tmp_path: Path, cut: int, no_writing):
    # before: tarfile took the end of the file for the end of the archive, and the first members were unpacked
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"car_ims/{i:06d}.jpg")
            info.size = 10240
            tar.addfile(info, io.BytesIO(_acgt(10240, i)))
    archive = tmp_path / "car_ims.tar"
    archive.write_bytes(buffer.getvalue()[:cut])
    with pytest.raises(ArchiveError, match=r"car_ims.tar is damaged: .*without the tar end-of-archive block"):
        TarArchive().unpack(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_a_complete_plain_tar_unpacks(tmp_path: Path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"car_ims/{i:06d}.jpg")
            info.size = 100
            tar.addfile(info, io.BytesIO(_acgt(100, i)))
    archive = tmp_path / "car_ims.tar"
    archive.write_bytes(buffer.getvalue())
    assert TarArchive().unpack(archive, tmp_path / "dest") == 3
    assert len(_files(tmp_path / "dest")) == 3
