"""Safe unpacking: the layouts of the README's tar/unzip commands, and refusal of members that would escape."""

from __future__ import annotations

import gzip
import io
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from raml.data.archives import ArchiveError, PlainFile, TarArchive, ZipArchive, safe_member_name


def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
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
    assert ZipArchive().unpacked_size(archive) == sum(len(v) for v in expected.values())
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


def test_gzip_size_bound_is_the_unpacked_size_of_a_small_archive(tmp_path: Path):
    archive = _tar(tmp_path / "x.tgz", MEMBERS)
    with gzip.open(archive) as f:
        unpacked = len(f.read())
    assert TarArchive().unpacked_size(archive) == unpacked
    plain = tmp_path / "cars_annos.mat"
    plain.write_bytes(b"matlab")
    assert PlainFile().unpacked_size(plain) == 6
    assert PlainFile().unpack(plain, tmp_path / "cars") == 1
    assert (tmp_path / "cars" / "cars_annos.mat").read_bytes() == b"matlab"
