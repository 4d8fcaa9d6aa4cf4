"""``raml data download`` on loopback servers: archives built from the fixture datasets in the internal
layout of the official files; resume, refusals, and that ``raml check-data`` / ``raml test`` work after."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from raml.cli.main import main
from raml.data import download as download_module
from raml.data.download import DOWNLOADS_DIR, SOURCE_FILE, DigestMismatchError, DownloadSettings, fetch, install_dataset
from raml.data.sources import DIGEST_HEX_LENGTHS, SOURCES, Digest
from raml.errors import DownloadError
from raml.models import build_network, save_checkpoint
from raml.utils import file_digests

FAST = ["--no-progress", "--retry-wait", "0", "--timeout", "10", "--workers", "2"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tgz(folder: Path, arcname: str, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:  # as test_archives.py's _tar
        tar.add(folder, arcname=arcname)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def official_files(name: str, data_root: Path) -> dict[str, bytes]:
    """The dataset's official files, built from a fixture folder, with the official archives' inner layout."""
    folder = data_root / name
    if name == "cub":  # CUB_200_2011/... plus a top-level attributes.txt (dropped by --strip-components=1)
        return {"CUB_200_2011.tgz": _tgz(folder, "CUB_200_2011", {"attributes.txt": b"1 has_bill_shape::dagger\n"})}
    if name == "cars":  # car_ims/NNNNNN.jpg; the annotations come as a file of their own
        return {
            "car_ims.tgz": _tgz(folder / "car_ims", "car_ims"),
            "cars_annos.mat": (folder / "cars_annos.mat").read_bytes(),
        }
    buffer = io.BytesIO()  # SOP: every member under Stanford_Online_Products/
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("Stanford_Online_Products/", b"")
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, f"Stanford_Online_Products/{path.relative_to(folder)}")
    return {"Stanford_Online_Products.zip": buffer.getvalue()}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pin(monkeypatch: pytest.MonkeyPatch, name: str, digests: dict[str, Digest | None]) -> None:
    """Give the files of dataset ``name`` in the registry these pinned digests (the others keep theirs)."""
    source = SOURCES[name]
    files = tuple(replace(f, digest=digests.get(f.name, f.digest)) for f in source.files)
    monkeypatch.setitem(SOURCES, name, replace(source, files=files))


@pytest.fixture(autouse=True)
def _unpinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture archives cannot match the official files' digests: tests run with none pinned, unless they
    pin the fixture's own (or a wrong one) with :func:`_pin`."""
    for source in list(SOURCES.values()):
        _pin(monkeypatch, source.name, {f.name: None for f in source.files})


def _md5(content: bytes) -> Digest:
    return Digest("md5", hashlib.md5(content).hexdigest(), "the test")


@pytest.fixture
def tiny_network(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "net.pth"
    save_checkpoint(path, build_network("test_resnet", whitening=8, pretrained=False))
    return path


@pytest.mark.parametrize("name", ["cub", "cars", "sop"])
def test_download_gives_the_readme_layout_and_check_data_and_test_work(
    name, request, http_server, tiny_network, tmp_path, monkeypatch, capsys
):
    source_root = request.getfixturevalue(f"{name}_root")
    files = official_files(name, source_root)
    http_server.files.update(files)
    root = tmp_path / "downloaded"
    if name == "cars":  # a mirror holding every file, through the environment
        monkeypatch.setenv("RAML_DATA_MIRROR", http_server.base_url + "/")
        urls = []
    else:
        urls = [arg for f in files for arg in ("--url", f"{f}={http_server.url(f)}")]
    assert main(["data", "download", name, "--data-root", str(root), *urls, *FAST]) == 0
    out = capsys.readouterr().out
    assert "all present and readable" in out

    # exactly the files of the README's commands (the fixture folder), plus SOURCE.json
    got = _files(root / name)
    record = json.loads(got.pop(SOURCE_FILE))
    assert got == _files(source_root / name)
    assert [r["file"] for r in record["files"]] == list(files)
    for r in record["files"]:
        content = files[r["file"]]
        assert (r["size"], r["sha256"]) == (len(content), hashlib.sha256(content).hexdigest())
        assert r["url"] == http_server.url(r["file"]) and r["date"].endswith("Z")
    assert record["counts"]["images"] == sum(1 for p in got if p.lower().endswith(".jpg"))
    assert not list((root / DOWNLOADS_DIR).iterdir())  # archives removed, as the README's rm does
    assert not list(root.glob(".*"))  # no staging folder left

    # a second run finds everything in place, says so, and asks the server nothing
    asked = len(http_server.requests)
    assert main(["data", "download", name, "--data-root", str(root), *urls, *FAST]) == 0
    assert "already in place" in capsys.readouterr().out
    assert len(http_server.requests) == asked

    assert main(["check-data", "--data-root", str(root), "--datasets", f"{name},{name}-test", "--no-progress"]) == 0
    results = tmp_path / "results.json"
    argv = ["test", "--datasets", f"{name}-test", "--sym", "--student-path", str(tiny_network), "--image-size", "32"]
    argv += ["--data-root", str(root), "--workers", "0", "--device", "cpu", "--no-progress", "--json", str(results)]
    assert main(argv) == 0
    assert json.loads(results.read_text())[f"{name}-test"]["sym"]["num_queries"] > 0


def _serve_cub(http_server, cub_root: Path) -> tuple[bytes, list[str]]:
    content = official_files("cub", cub_root)["CUB_200_2011.tgz"]
    http_server.files["CUB_200_2011.tgz"] = content
    return content, ["--url", f"CUB_200_2011.tgz={http_server.url('CUB_200_2011.tgz')}"]


def _no_dataset_left(root: Path, name: str = "cub") -> None:
    assert not (root / name).exists()
    assert not list(root.glob(f".{name}.*"))


def test_a_dropped_connection_continues_from_the_byte_where_it_stopped(http_server, cub_root, tmp_path):
    content, url = _serve_cub(http_server, cub_root)
    half = len(content) // 2
    http_server.drop_after["CUB_200_2011.tgz"] = [half, 1]
    root = tmp_path / "dl"
    assert main(["data", "download", "cub", "--data-root", str(root), "--keep-archives", *url, *FAST]) == 0
    assert http_server.requests == [("CUB_200_2011.tgz", None), ("CUB_200_2011.tgz", f"bytes={half}-")]
    assert (root / DOWNLOADS_DIR / "CUB_200_2011.tgz").read_bytes() == content
    record = json.loads((root / "cub" / SOURCE_FILE).read_text())
    assert record["files"][0]["sha256"] == hashlib.sha256(content).hexdigest()


def test_an_interrupted_run_leaves_no_dataset_and_the_next_run_resumes(http_server, cub_root, tmp_path, capsys):
    content, url = _serve_cub(http_server, cub_root)
    cut = len(content) // 3
    http_server.drop_after["CUB_200_2011.tgz"] = [cut, 1]
    root = tmp_path / "dl"
    assert main(["data", "download", "cub", "--data-root", str(root), "--retries", "1", *url, *FAST]) == 2
    err = capsys.readouterr().err
    assert "CUB_200_2011.tgz.part keeps the" in err and "tar -xf" in err  # resumable, and the manual way
    _no_dataset_left(root)
    assert (root / DOWNLOADS_DIR / "CUB_200_2011.tgz.part").stat().st_size == cut
    assert main(["data", "download", "cub", "--data-root", str(root), *url, *FAST]) == 0
    assert http_server.requests[-1] == ("CUB_200_2011.tgz", f"bytes={cut}-")
    assert _files(root / "cub").keys() - {SOURCE_FILE} == _files(cub_root / "cub").keys()


def _interrupted(http_server, name: str, content: bytes, dest: Path, cut: int) -> str:
    """A first transfer of ``content`` that breaks after ``cut`` bytes: ``dest.part`` (and its record) remain.
    Returns the error message."""
    http_server.files[name] = content
    http_server.drop_after[name] = [cut, 1]
    with pytest.raises(download_module.DownloadError) as failed:
        fetch(http_server.url(name), dest, DownloadSettings(attempts=1, retry_wait=0, progress=False))
    assert dest.with_name(dest.name + ".part").stat().st_size == cut
    return str(failed.value)


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_a_server_that_ignores_range_is_read_again_from_the_start(http_server, tmp_path, caplog):
    content = _random_bytes(50_000, 0)
    dest = tmp_path / "CUB_200_2011.tgz"
    _interrupted(http_server, "CUB_200_2011.tgz", content, dest, 20_000)
    http_server.ignore_range = True
    fetch(http_server.url("CUB_200_2011.tgz"), dest, DownloadSettings(retry_wait=0, progress=False))
    assert http_server.requests[1:] == [("CUB_200_2011.tgz", "bytes=20000-")]
    assert dest.read_bytes() == content  # overwritten from byte 0, not appended
    assert "ignored the request to continue" in caplog.text


# ------------------------------------------------------------------------- issue 18, item 4: one version only
SETTINGS = DownloadSettings(retry_wait=0, progress=False)


def test_a_file_that_changed_on_the_server_between_runs_is_read_again_from_byte_zero(http_server, tmp_path, caplog):
    old, new = _random_bytes(100_000, 1), _random_bytes(100_000, 2)  # one size: only the validators differ
    dest = tmp_path / "car_ims.tgz"
    _interrupted(http_server, "car_ims.tgz", old, dest, 40_000)
    old_etag = http_server.etag("car_ims.tgz")
    record = dest.with_name("car_ims.tgz.part.json")  # persisted beside the .part: what the next run uses
    started = json.loads(record.read_text()) if record.exists() else {}
    http_server.files["car_ims.tgz"] = new  # the remote file changes before the next run
    fetch(http_server.url("car_ims.tgz"), dest, SETTINGS)
    assert dest.read_bytes() == new  # not the first 40,000 bytes of the old file + the rest of the new one
    assert http_server.requests[1:] == [("car_ims.tgz", "bytes=40000-")]
    assert http_server.if_ranges[1:] == [old_etag]  # the server answered 200 with the whole new file
    assert "changed on the server" in caplog.text
    assert started.get("etag") == old_etag and started.get("url") == http_server.url("car_ims.tgz")
    done = json.loads(dest.with_name("car_ims.tgz.download.json").read_text())
    assert done["etag"] == http_server.etag("car_ims.tgz") and done["url"] == http_server.url("car_ims.tgz")
    assert not dest.with_name("car_ims.tgz.part.json").exists()


def test_an_unchanged_file_is_continued_with_if_range(http_server, tmp_path):
    content = _random_bytes(100_000, 3)
    dest = tmp_path / "car_ims.tgz"
    assert "continues from there" in _interrupted(http_server, "car_ims.tgz", content, dest, 40_000)
    fetch(http_server.url("car_ims.tgz"), dest, SETTINGS)
    assert dest.read_bytes() == content
    assert http_server.requests[1:] == [("car_ims.tgz", "bytes=40000-")]
    assert http_server.if_ranges[1:] == [http_server.etag("car_ims.tgz")]


def test_a_206_of_another_version_is_not_appended(http_server, tmp_path, caplog):
    old, new = _random_bytes(100_000, 4), _random_bytes(100_000, 5)
    dest = tmp_path / "car_ims.tgz"
    _interrupted(http_server, "car_ims.tgz", old, dest, 40_000)
    http_server.files["car_ims.tgz"] = new
    http_server.ignore_if_range = True  # a broken server: 206 whatever the If-Range, but with the new ETag
    fetch(http_server.url("car_ims.tgz"), dest, SETTINGS)
    assert dest.read_bytes() == new
    assert [r for _, r in http_server.requests[1:]] == ["bytes=40000-", None]
    assert "ETag changed" in caplog.text


def test_without_validators_a_partial_file_is_not_continued(http_server, tmp_path, caplog):
    content = _random_bytes(100_000, 6)
    http_server.validators = False  # no ETag, no Last-Modified: a change could not be told
    dest = tmp_path / "car_ims.tgz"
    assert "running again starts from byte 0" in _interrupted(http_server, "car_ims.tgz", content, dest, 40_000)
    fetch(http_server.url("car_ims.tgz"), dest, SETTINGS)
    assert dest.read_bytes() == content
    assert [r for _, r in http_server.requests] == [None, None]
    assert "no record of which version" in caplog.text


def test_a_complete_part_file_is_finished_by_the_416_answer(http_server, tmp_path):
    content = _random_bytes(100_000, 7)
    dest = tmp_path / "car_ims.tgz"
    _interrupted(http_server, "car_ims.tgz", content, dest, 40_000)
    with open(dest.with_name("car_ims.tgz.part"), "ab") as part:  # a run stopped after the last byte
        part.write(content[40_000:])
    fetch(http_server.url("car_ims.tgz"), dest, SETTINGS)
    assert dest.read_bytes() == content
    assert http_server.requests[1:] == [("car_ims.tgz", "bytes=100000-")]  # answered 416 "bytes */100000"
    assert len(http_server.requests) == 2


def test_a_part_file_longer_than_the_remote_file_is_started_again(http_server, tmp_path, caplog):
    content = _random_bytes(100_000, 8)
    dest = tmp_path / "car_ims.tgz"
    _interrupted(http_server, "car_ims.tgz", content, dest, 40_000)
    with open(dest.with_name("car_ims.tgz.part"), "ab") as part:
        part.write(bytes(70_000))
    fetch(http_server.url("car_ims.tgz"), dest, SETTINGS)
    assert dest.read_bytes() == content
    assert [r for _, r in http_server.requests[1:]] == ["bytes=110000-", None]
    assert "HTTP 416" in caplog.text


def test_a_server_that_ignores_range_and_keeps_dropping_is_a_clear_error(http_server, cub_root, tmp_path, capsys):
    content, url = _serve_cub(http_server, cub_root)
    http_server.ignore_range = True
    http_server.drop_after["CUB_200_2011.tgz"] = [len(content) // 2, -1]
    root = tmp_path / "dl"
    assert main(["data", "download", "cub", "--data-root", str(root), "--retries", "3", *url, *FAST]) == 2
    err = capsys.readouterr().err
    assert "ignored the request to continue a partial transfer" in err and "3 attempts" in err
    assert [r for _, r in http_server.requests] == [None, f"bytes={len(content) // 2}-", f"bytes={len(content) // 2}-"]
    _no_dataset_left(root)


def test_404_names_the_url_and_the_manual_commands(http_server, tmp_path, capsys):
    root = tmp_path / "dl"
    missing = http_server.url("CUB_200_2011.tgz")
    assert (
        main(["data", "download", "cub", "--data-root", str(root), "--url", f"CUB_200_2011.tgz={missing}", *FAST]) == 2
    )
    err = capsys.readouterr().err
    assert missing in err and "HTTP 404" in err
    assert "--strip-components=1" in err and "RAML_DATA_MIRROR" in err
    assert len(http_server.requests) == 1  # a 404 is not retried
    _no_dataset_left(root)


def test_unreachable_host_is_a_clear_error(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "dl"
    url = f"http://127.0.0.1:{port}/car_ims.tgz"
    assert (
        main(
            [
                "data",
                "download",
                "cars",
                "--data-root",
                str(root),
                "--url",
                f"car_ims.tgz={url}",
                "--retries",
                "2",
                *FAST,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert url in err and "2 attempts" in err and "car_ims.tgz" in err
    _no_dataset_left(root, "cars")


@pytest.mark.parametrize("damage", ["truncated", "traversal", "missing image"])
def test_a_bad_archive_leaves_no_dataset_folder(damage, http_server, cub_root, tmp_path, capsys):
    folder = cub_root / "cub"
    if damage == "truncated":
        content = official_files("cub", cub_root)["CUB_200_2011.tgz"]
        content = content[: len(content) * 2 // 3]
    elif damage == "traversal":
        content = _tgz(folder, "CUB_200_2011", {"CUB_200_2011/../../../escaped.txt": b"x"})
    else:
        next((folder / "images").rglob("*.jpg")).unlink()
        content = official_files("cub", cub_root)["CUB_200_2011.tgz"]
    http_server.files["CUB_200_2011.tgz"] = content
    root = tmp_path / "dl"
    url = ["--url", f"CUB_200_2011.tgz={http_server.url('CUB_200_2011.tgz')}"]
    assert main(["data", "download", "cub", "--data-root", str(root), *url, *FAST]) == 2
    err = capsys.readouterr().err
    expected = {"truncated": "is damaged", "traversal": "climbs out", "missing image": "missing file"}[damage]
    assert expected in err
    _no_dataset_left(root)
    assert not list(tmp_path.rglob("escaped.txt"))
    # the downloaded file is kept (nothing already written is lost), and named in the message
    assert (root / DOWNLOADS_DIR / "CUB_200_2011.tgz").read_bytes() == content


def test_not_enough_space_stops_before_writing(http_server, cub_root, tmp_path, monkeypatch, capsys):
    _, url = _serve_cub(http_server, cub_root)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(download_module.shutil, "disk_usage", lambda _: usage._replace(free=100))
    root = tmp_path / "dl"
    assert main(["data", "download", "cub", "--data-root", str(root), *url, *FAST]) == 2
    assert "Not enough free space" in capsys.readouterr().err
    assert not list((root / DOWNLOADS_DIR).iterdir())
    _no_dataset_left(root)


def test_an_incomplete_existing_folder_is_refused_then_replaced_with_force(http_server, cub_root, tmp_path, capsys):
    _, url = _serve_cub(http_server, cub_root)
    root = tmp_path / "dl"
    (root / "cub").mkdir(parents=True)
    (root / "cub" / "mine.txt").write_text("precious")
    assert main(["data", "download", "cub", "--data-root", str(root), *url, *FAST]) == 2
    assert "not a complete dataset" in capsys.readouterr().err
    assert (root / "cub" / "mine.txt").read_text() == "precious" and not http_server.requests
    assert main(["data", "download", "cub", "--data-root", str(root), "--force", *url, *FAST]) == 0
    assert not (root / "cub" / "mine.txt").exists() and (root / "cub" / SOURCE_FILE).is_file()


def test_a_complete_folder_placed_by_hand_is_left_alone(cub_root, capsys):
    before = _files(cub_root / "cub")
    assert main(["data", "download", "cub", "--data-root", str(cub_root), *FAST]) == 0
    assert "placed by hand" in capsys.readouterr().out
    assert _files(cub_root / "cub") == before


def test_a_file_put_into_downloads_by_hand_is_used_kept_and_named_as_such(cub_root, tmp_path, capsys):
    root = tmp_path / "dl"
    (root / DOWNLOADS_DIR).mkdir(parents=True)
    placed = root / DOWNLOADS_DIR / "CUB_200_2011.tgz"
    content = official_files("cub", cub_root)["CUB_200_2011.tgz"]
    placed.write_bytes(content)
    dead = "http://127.0.0.1:9/none"
    assert main(["data", "download", "cub", "--data-root", str(root), "--url", f"CUB_200_2011.tgz={dead}", *FAST]) == 0
    out = capsys.readouterr().out
    assert placed.read_bytes() == content  # it may be the user's only copy: never deleted
    assert f"kept {placed}" in out and "by hand" in out
    assert dead not in out  # the address was never contacted, so it is not named as the source
    record = json.loads((root / "cub" / SOURCE_FILE).read_text())["files"][0]
    assert record["url"] is None and "by hand" in record["obtained"]


def test_a_file_downloaded_by_an_earlier_run_is_deleted_and_its_url_named(http_server, cub_root, tmp_path, capsys):
    content, url = _serve_cub(http_server, cub_root)
    root = tmp_path / "dl"
    argv = ["data", "download", "cub", "--data-root", str(root), *url, *FAST]
    assert main([*argv, "--keep-archives"]) == 0
    archive = root / DOWNLOADS_DIR / "CUB_200_2011.tgz"
    assert archive.read_bytes() == content
    capsys.readouterr()
    assert main([*argv, "--force"]) == 0  # not asked again, but known as raml's own download: removed
    out = capsys.readouterr().out
    assert len(http_server.requests) == 1 and not archive.exists()
    assert f"from {http_server.url('CUB_200_2011.tgz')}" in out
    assert not list((root / DOWNLOADS_DIR).iterdir())  # its download record goes with it


@pytest.mark.parametrize("url", ["file:///tmp/CUB_200_2011.tgz", "http:///CUB_200_2011.tgz", "mirror/CUB_200_2011.tgz"])
def test_unusable_addresses_fail_at_once(url, tmp_path, capsys):
    assert (
        main(["data", "download", "cub", "--data-root", str(tmp_path), "--url", f"CUB_200_2011.tgz={url}", *FAST]) == 2
    )
    assert "expected an address such as https://host/path/file" in capsys.readouterr().err
    assert not (tmp_path / "cub").exists()


@pytest.mark.parametrize("flag", [["--timeout", "0"], ["--retry-wait", "-1"]])
def test_bad_download_settings_are_clear_errors(flag, tmp_path, capsys):
    argv = ["data", "download", "cub", "--data-root", str(tmp_path / "dl"), "--no-progress", *flag]
    assert main(argv) == 2
    assert flag[0] in capsys.readouterr().err
    assert not (tmp_path / "dl").exists()


@pytest.mark.parametrize("bad", ["nonsense", "other.tgz=http://x/y", "CUB_200_2011.tgz="])
def test_bad_url_overrides_are_clear_errors(bad, tmp_path, capsys):
    assert main(["data", "download", "cub", "--data-root", str(tmp_path), "--url", bad, *FAST]) == 2
    err = capsys.readouterr().err
    assert "--url" in err and "CUB_200_2011.tgz" in err
    assert not list(tmp_path.iterdir())


def test_sop_over_ftp_resumes_with_rest(ftp_server, sop_root, tmp_path):
    content = official_files("sop", sop_root)["Stanford_Online_Products.zip"]
    (ftp_server.root / "Stanford_Online_Products.zip").write_bytes(content)
    root = tmp_path / "dl"
    part = root / DOWNLOADS_DIR / "Stanford_Online_Products.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(content[:1000])  # what an interrupted earlier run left, with its record
    address = ftp_server.url("Stanford_Online_Products.zip")
    record = {"url": address, "size": len(content), "modified": _mdtm(ftp_server, "Stanford_Online_Products.zip")}
    part.with_name("Stanford_Online_Products.zip.part.json").write_text(json.dumps(record))
    url = ["--url", f"Stanford_Online_Products.zip={address}"]
    assert main(["data", "download", "sop", "--data-root", str(root), "--keep-archives", *url, *FAST]) == 0
    assert ftp_server.rest_offsets == [1000]
    assert (root / DOWNLOADS_DIR / "Stanford_Online_Products.zip").read_bytes() == content
    assert _files(root / "sop").keys() - {SOURCE_FILE} == _files(sop_root / "sop").keys()


def _mdtm(ftp_server, name: str) -> str:
    import ftplib

    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", ftp_server.port)
        ftp.login()
        return ftp.sendcmd(f"MDTM {name}").split()[-1]


@pytest.mark.parametrize("change", ["modified", "size", "url"])
def test_ftp_partial_file_of_another_version_is_started_again(change, ftp_server, tmp_path):
    content = _random_bytes(30_000, 9)
    (ftp_server.root / "car_ims.tgz").write_bytes(content)
    dest = tmp_path / "car_ims.tgz"
    address = ftp_server.url("car_ims.tgz")
    record = {"url": address, "size": len(content), "modified": _mdtm(ftp_server, "car_ims.tgz")}
    record[change] = {"modified": "19990101000000", "size": 12345, "url": "ftp://elsewhere/car_ims.tgz"}[change]
    dest.with_name("car_ims.tgz.part").write_bytes(b"a version that is not on the server any more")
    dest.with_name("car_ims.tgz.part.json").write_text(json.dumps(record))
    fetch(address, dest, SETTINGS)
    assert dest.read_bytes() == content and ftp_server.rest_offsets == []


def test_ftp_missing_file_is_not_retried(ftp_server, tmp_path, capsys):
    url = ftp_server.url("Stanford_Online_Products.zip")
    argv = [
        "data",
        "download",
        "sop",
        "--data-root",
        str(tmp_path / "dl"),
        "--url",
        f"Stanford_Online_Products.zip={url}",
    ]
    assert main([*argv, *FAST]) == 2
    err = capsys.readouterr().err
    assert url in err and "550" in err and "unzip" in err


def test_the_table_holds_the_readmes_files_and_urls():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for source in SOURCES.values():
        for remote in source.files:
            assert remote.url in readme, remote.url


def test_failed_attempts_wait_twice_as_long_each_time(http_server, tmp_path, monkeypatch):
    http_server.files["car_ims.tgz"] = b"x" * 1000
    http_server.drop_after["car_ims.tgz"] = [10, -1]  # never completes:
    http_server.ignore_range = True  # every attempt starts again at byte 0 and breaks at byte 10
    waits: list[float] = []
    monkeypatch.setattr(download_module.time, "sleep", waits.append)
    settings = DownloadSettings(attempts=5, retry_wait=2.0, max_wait=6.0, progress=False)
    with pytest.raises(download_module.DownloadError, match="5 attempts"):
        fetch(http_server.url("car_ims.tgz"), tmp_path / "car_ims.tgz", settings)
    assert waits == [2.0, 4.0, 6.0, 6.0]
    assert [r for _, r in http_server.requests] == [None] + ["bytes=10-"] * 4
    assert (tmp_path / "car_ims.tgz.part").read_bytes() == b"x" * 10


# ------------------------------------------------------------------------------------ issue 18, items 1-2 end to end
def test_the_symlink_chain_archive_is_refused_end_to_end(http_server, cars_root, tmp_path, capsys, symlink_chain_tgz):
    http_server.files["car_ims.tgz"] = symlink_chain_tgz
    http_server.files["cars_annos.mat"] = (cars_root / "cars" / "cars_annos.mat").read_bytes()
    root = tmp_path / "dl"
    urls = [arg for f in ("car_ims.tgz", "cars_annos.mat") for arg in ("--url", f"{f}={http_server.url(f)}")]
    assert main(["data", "download", "cars", "--data-root", str(root), *urls, *FAST]) == 2
    err = capsys.readouterr().err
    assert "member 'a' is a symbolic link" in err and "car_ims.tgz" in err
    assert not list(tmp_path.rglob("escaped.txt"))
    _no_dataset_left(root, "cars")


def test_a_forged_gzip_trailer_cannot_pass_the_free_space_check_end_to_end(cub_root, tmp_path, monkeypatch, capsys):
    """A hand-placed archive (no download-time check) whose gzip trailer claims 1,000 bytes: the unpacking
    adds up the members' sizes instead, and stops before writing."""
    filler = random.Random(0).randbytes(3 << 20).translate(bytes(b"ACGT"[i % 4] for i in range(256)))
    content = _tgz(cub_root / "cub", "CUB_200_2011", {"CUB_200_2011/filler.bin": filler})
    forged = content[:-4] + (1000).to_bytes(4, "little")
    root = tmp_path / "dl"
    (root / DOWNLOADS_DIR).mkdir(parents=True)
    (root / DOWNLOADS_DIR / "CUB_200_2011.tgz").write_bytes(forged)
    assert len(forged) < 2 << 20 < len(filler)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(download_module.shutil, "disk_usage", lambda _: usage._replace(free=2 << 20))
    dead = ["--url", "CUB_200_2011.tgz=http://127.0.0.1:9/none"]
    assert main(["data", "download", "cub", "--data-root", str(root), *dead, *FAST]) == 2
    assert "Not enough free space for unpacking CUB_200_2011.tgz" in capsys.readouterr().err
    _no_dataset_left(root)
    assert (root / DOWNLOADS_DIR / "CUB_200_2011.tgz").read_bytes() == forged  # placed by hand: kept


# ------------------------------------------------------------------- the announced size bounds a download (audit)
def test_an_ftp_server_sending_more_than_its_size_is_stopped_and_its_part_removed(ftp_server, tmp_path):
    (ftp_server.root / "car_ims.tgz").write_bytes(_random_bytes(300_000, 11))
    ftp_server.announced_sizes["car_ims.tgz"] = 1000  # SIZE says 1000, RETR sends 300,000
    dest = tmp_path / "car_ims.tgz"
    (tmp_path / "cars_annos.mat").write_bytes(b"fetched earlier")
    url = ftp_server.url("car_ims.tgz")
    with pytest.raises(DownloadError, match=r"more than the 1000 bytes it announced \(FTP SIZE\)") as refused:
        fetch(url, dest, DownloadSettings(attempts=3, retry_wait=0, progress=False))
    assert url in str(refused.value) and "mirror" in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cars_annos.mat", "ftp"]  # no .part, no record
    assert (tmp_path / "cars_annos.mat").read_bytes() == b"fetched earlier"


def test_receive_never_writes_past_the_announced_size(tmp_path):
    transfer = download_module._Transfer("http://host/f.tgz", tmp_path / "f.tgz.part", SETTINGS)
    source, out = io.BytesIO(bytes(5000)), io.BytesIO()
    with pytest.raises(download_module._Permanent, match=r"more than the 4096 bytes it announced \(Content-Range\)"):
        download_module._receive(transfer, lambda: source.read(1024), out, _NoBar(), 0, 4096, "Content-Range")
    assert len(out.getvalue()) == 4096  # the chunks that fit, not one byte more
    source, out = io.BytesIO(bytes(4096)), io.BytesIO()
    assert download_module._receive(transfer, lambda: source.read(1024), out, _NoBar(), 0, 4096, "SIZE") == 4096


class _NoBar:
    def update(self, _: int) -> None:
        pass


def test_without_a_content_length_the_download_works_as_before(http_server, tmp_path):
    content = _random_bytes(50_000, 12)
    http_server.files["car_ims.tgz"] = content
    http_server.send_length = False
    dest = tmp_path / "car_ims.tgz"
    fetch(http_server.url("car_ims.tgz"), dest, SETTINGS)
    assert dest.read_bytes() == content


def test_without_a_content_length_the_free_space_is_watched_as_data_arrives(http_server, tmp_path, monkeypatch):
    content = _random_bytes(50_000, 13)
    http_server.files["car_ims.tgz"] = content
    http_server.send_length = False
    monkeypatch.setattr(download_module, "CHUNK", 4096)
    monkeypatch.setattr(download_module, "SPACE_CHECK_BYTES", 10_000)
    usage = shutil.disk_usage(tmp_path)
    checks: list[int] = []

    def disk_filling_up(_: object) -> object:  # another program fills the disk after the first check
        checks.append(1)
        return usage._replace(free=1 << 40 if len(checks) == 1 else 9_999)

    monkeypatch.setattr(shutil, "disk_usage", disk_filling_up)
    dest = tmp_path / "car_ims.tgz"
    url = http_server.url("car_ims.tgz")
    with pytest.raises(OSError, match=r"Not enough free space for downloading .*did not announce its size") as stop:
        fetch(url, dest, SETTINGS)
    assert url in str(stop.value) and "keeps the 12288 bytes received" in str(stop.value)
    part = dest.with_name("car_ims.tgz.part")
    assert part.read_bytes() == content[:12288]  # what arrived is kept: the next run can use it
    assert not dest.exists()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"timeout": float("nan")}, "timeout (--timeout)"),
        ({"timeout": float("inf")}, "timeout (--timeout)"),
        ({"timeout": 0.0}, "timeout (--timeout)"),
        ({"retry_wait": float("nan")}, "retry_wait (--retry-wait)"),
        ({"retry_wait": float("inf")}, "retry_wait (--retry-wait)"),
        ({"retry_wait": -1.0}, "retry_wait (--retry-wait)"),
        ({"max_wait": float("nan")}, "max_wait"),
        ({"attempts": 0}, "attempts (--retries)"),
    ],
)
def test_download_settings_refuse_non_finite_values_naming_the_setting(changes, named):
    with pytest.raises(ValueError, match=re.escape(f"Expected {named}")):
        DownloadSettings(**changes)
    DownloadSettings(timeout=0.5, retry_wait=0.0, max_wait=0.0)  # the edges are accepted


def test_download_cli_refuses_a_nan_timeout_before_any_transfer(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["data", "download", "cub", "--data-root", str(root), *FAST, "--timeout", "nan"]) == 2
    err = capsys.readouterr().err
    assert "timeout (--timeout)" in err and "finite" in err and "Traceback" not in err
    assert not root.exists() or not any(root.rglob("*.part"))


# ------------------------------------------------------------------------------------------- pinned digests
_REGISTRY = dict(SOURCES)
"""The registry as imported, before the autouse :func:`_unpinned` replaces its entries for a test."""


def test_the_registry_pins_every_file_with_well_formed_hex():
    """The published MD5s (see raml.data.sources): a lowercase hex digest of the algorithm's length each."""
    names = [f.name for s in _REGISTRY.values() for f in s.files]
    assert names == ["CUB_200_2011.tgz", "car_ims.tgz", "cars_annos.mat", "Stanford_Online_Products.zip"]
    for source in _REGISTRY.values():
        for remote in source.files:
            assert remote.digest is not None, remote.name
            assert remote.digest.algorithm in DIGEST_HEX_LENGTHS
            assert len(remote.digest.hex) == DIGEST_HEX_LENGTHS[remote.digest.algorithm], remote.name
            assert re.fullmatch(r"[0-9a-f]+", remote.digest.hex), remote.name
            assert "/" in remote.digest.published_by  # names the repositories it comes from


@pytest.mark.parametrize(
    ("algorithm", "hex_digest"),
    [("md5", "97ECEEB196236B17998738112F37DF78"), ("md5", "97eceeb1"), ("md4", "0" * 32), ("sha256", "g" * 64)],
)
def test_a_malformed_digest_is_refused(algorithm, hex_digest):
    with pytest.raises(ValueError, match="Expected"):
        Digest(algorithm, hex_digest, "nobody")


def test_file_digests_reads_once_for_several_algorithms(tmp_path):
    path = tmp_path / "f.bin"
    content = _random_bytes(3 << 20, seed=3)
    path.write_bytes(content)
    got = file_digests(path, ["sha256", "md5", "sha256"], chunk_size=1 << 20)
    assert got == {"sha256": hashlib.sha256(content).hexdigest(), "md5": hashlib.md5(content).hexdigest()}


def test_a_file_matching_its_pinned_digest_is_unpacked_and_recorded(
    http_server, cub_root, tmp_path, monkeypatch, capsys
):
    content, url = _serve_cub(http_server, cub_root)
    _pin(monkeypatch, "cub", {"CUB_200_2011.tgz": _md5(content)})
    root = tmp_path / "dl"
    assert main(["data", "download", "cub", "--data-root", str(root), *url, *FAST]) == 0
    assert "md5 matches the published digest" in capsys.readouterr().out
    record = json.loads((root / "cub" / SOURCE_FILE).read_text())["files"][0]
    assert record["pinned_digest"] == {
        "algorithm": "md5",
        "expected": hashlib.md5(content).hexdigest(),
        "actual": hashlib.md5(content).hexdigest(),
        "matched": True,
        "published_by": "the test",
    }
    assert record["sha256"] == hashlib.sha256(content).hexdigest()


def test_a_downloaded_file_that_differs_is_refused_removed_and_nothing_unpacked(
    http_server, cars_root, tmp_path, monkeypatch, capsys
):
    """cars: car_ims.tgz matches, cars_annos.mat (fetched through --url, a mirror) does not: neither is unpacked."""
    files = official_files("cars", cars_root)
    http_server.files.update(files)
    wrong = _md5(b"the published file")
    _pin(monkeypatch, "cars", {"car_ims.tgz": _md5(files["car_ims.tgz"]), "cars_annos.mat": wrong})
    root = tmp_path / "dl"
    urls = [arg for f in files for arg in ("--url", f"{f}={http_server.url(f)}")]
    assert main(["data", "download", "cars", "--data-root", str(root), *urls, *FAST]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    error = errors[0]
    actual = hashlib.md5(files["cars_annos.mat"]).hexdigest()
    assert "cars_annos.mat" in error and wrong.hex in error and actual in error
    assert "removed" in error and "--no-verify-digest" in error and "was not created" in error
    _no_dataset_left(root, "cars")
    downloads = root / DOWNLOADS_DIR
    assert not (downloads / "cars_annos.mat").exists()
    assert not (downloads / "cars_annos.mat.download.json").exists()


def test_a_file_from_an_earlier_run_that_differs_is_refused_and_removed(http_server, cub_root, tmp_path, monkeypatch):
    content, url = _serve_cub(http_server, cub_root)
    root = tmp_path / "dl"
    assert main(["data", "download", "cub", "--data-root", str(root), "--keep-archives", *url, *FAST]) == 0
    archive = root / DOWNLOADS_DIR / "CUB_200_2011.tgz"
    assert archive.is_file()
    _pin(monkeypatch, "cub", {"CUB_200_2011.tgz": _md5(b"another file")})
    with pytest.raises(DigestMismatchError, match="it was removed.*left as it was"):
        install_dataset("cub", root, force=True, settings=DownloadSettings(progress=False))
    assert not archive.exists()
    assert (root / "cub" / SOURCE_FILE).is_file()  # the dataset already in place is untouched


def test_a_file_placed_by_hand_that_differs_is_refused_and_kept(cub_root, tmp_path, monkeypatch, capsys):
    root = tmp_path / "dl"
    (root / DOWNLOADS_DIR).mkdir(parents=True)
    placed = root / DOWNLOADS_DIR / "CUB_200_2011.tgz"
    content = official_files("cub", cub_root)["CUB_200_2011.tgz"]
    placed.write_bytes(content)
    wrong = _md5(b"the published file")
    _pin(monkeypatch, "cub", {"CUB_200_2011.tgz": wrong})
    assert main(["data", "download", "cub", "--data-root", str(root), *FAST]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert "left in place" in errors[0] and str(placed) in errors[0] and wrong.hex in errors[0]
    assert hashlib.md5(content).hexdigest() in errors[0]
    assert placed.read_bytes() == content  # never deleted: it may be the user's only copy
    _no_dataset_left(root)


def test_no_verify_digest_accepts_a_differing_file_with_a_warning(http_server, cub_root, tmp_path, monkeypatch, capsys):
    content, url = _serve_cub(http_server, cub_root)
    wrong = _md5(b"the published file")
    _pin(monkeypatch, "cub", {"CUB_200_2011.tgz": wrong})
    root = tmp_path / "dl"
    assert main(["data", "download", "cub", "--data-root", str(root), "--no-verify-digest", *url, *FAST]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "--no-verify-digest" in warnings[0], warnings
    assert wrong.hex in warnings[0] and hashlib.md5(content).hexdigest() in warnings[0]
    assert "DIFFERS from the published digest" in captured.out
    record = json.loads((root / "cub" / SOURCE_FILE).read_text())["files"][0]
    assert record["pinned_digest"]["matched"] is False
    assert record["pinned_digest"]["actual"] == hashlib.md5(content).hexdigest()


def _placed_cub(cub_root: Path, root: Path) -> None:
    """The CUB archive put into ``<root>/downloads`` by hand (no network needed)."""
    (root / DOWNLOADS_DIR).mkdir(parents=True, exist_ok=True)
    (root / DOWNLOADS_DIR / "CUB_200_2011.tgz").write_bytes(official_files("cub", cub_root)["CUB_200_2011.tgz"])


def test_a_second_run_on_the_same_dataset_is_refused_while_the_first_unpacks(cub_root, tmp_path, monkeypatch, capsys):
    root = tmp_path / "dl"
    _placed_cub(cub_root, root)
    argv = ["data", "download", "cub", "--data-root", str(root), *FAST]
    verify = download_module.verify_dataset
    second: list[int] = []
    nested: list[bool] = []

    def verify_while_a_second_run_starts(name: str, folder: Path, **kwargs: object) -> object:
        if not nested:  # only in the first run (without the lock, the second ones would get here too)
            nested.append(True)
            second.append(main(argv))  # the first run holds the lock here, its staging folder full
            second.append(main([*argv, "--force"]))
        return verify(name, folder, **kwargs)

    monkeypatch.setattr(download_module, "verify_dataset", verify_while_a_second_run_starts)
    assert main(argv) == 0
    assert second == [2, 2]
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 2 and all("is being installed by raml data download cub (PID" in line for line in err), err
    assert _files(root / "cub").keys() - {SOURCE_FILE} == _files(cub_root / "cub").keys()
    assert not list(root.glob(".cub.*"))  # no staging folder, no lock folder left


def test_a_lock_left_by_a_killed_run_is_taken_over(cub_root, tmp_path, capsys):
    root = tmp_path / "dl"
    _placed_cub(cub_root, root)
    (root / ".cub.lock").mkdir()
    (root / ".cub.lock" / ".lock").write_text('{"pid": 999999999, "host": "h", "command": "raml data download cub"}\n')
    assert main(["data", "download", "cub", "--data-root", str(root), *FAST]) == 0
    assert "Taking over the stale lock" in capsys.readouterr().err
    assert (root / "cub" / SOURCE_FILE).is_file() and not list(root.glob(".cub.*"))


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_force_stopped_between_its_two_renames_puts_the_old_folder_back(stop, cub_root, tmp_path, monkeypatch):
    (cub_root / "cub" / "MY_NOTES.txt").write_text("mine")
    before = _files(cub_root / "cub")
    _placed_cub(cub_root, cub_root)
    replace = download_module.os.replace

    def stopped(src: object, dst: object) -> None:
        if str(src).endswith(".cub.partial"):
            raise stop("stopped between the renames")
        replace(src, dst)

    monkeypatch.setattr(download_module.os, "replace", stopped)
    argv = ["data", "download", "cub", "--data-root", str(cub_root), "--force", *FAST]
    if stop is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    else:
        assert main(argv) == 2
    assert _files(cub_root / "cub") == before
    assert not list(cub_root.glob(".cub.*"))


def test_an_old_folder_orphaned_by_a_killed_force_run_is_restored_not_deleted(cub_root, capsys):
    (cub_root / "cub" / "MY_NOTES.txt").write_text("mine")
    before = _files(cub_root / "cub")
    (cub_root / "cub").rename(cub_root / ".cub.old")  # killed between the renames: only .cub.old remains
    assert main(["data", "download", "cub", "--data-root", str(cub_root), *FAST]) == 0
    assert _files(cub_root / "cub") == before and not (cub_root / ".cub.old").exists()
    assert f"Restoring it to {cub_root / 'cub'}" in capsys.readouterr().err
    _placed_cub(cub_root, cub_root)
    (cub_root / "cub").rename(cub_root / ".cub.old")
    assert main(["data", "download", "cub", "--data-root", str(cub_root), "--force", *FAST]) == 0
    assert (cub_root / "cub" / SOURCE_FILE).is_file() and not list(cub_root.glob(".cub.*"))


def test_a_dataset_in_place_is_reported_where_no_lock_can_be_taken(cub_root, tmp_path, capsys, monkeypatch):
    """A read-only data root (a shared mount) or one without file locks: 'already in place', exit 0, as before the
    lock (the lock is taken only to change something)."""
    root = tmp_path / "ro"
    _placed_cub(cub_root, root)
    main(["data", "download", "cub", "--data-root", str(root), *FAST])  # installed; SOURCE.json written
    capsys.readouterr()

    def refused(self) -> None:  # noqa: ANN001
        raise OSError(30, "Read-only file system", str(root / ".cub.lock"))

    monkeypatch.setattr(download_module.DirectoryLock, "acquire", refused)
    assert main(["data", "download", "cub", "--data-root", str(root), *FAST]) == 0
    assert "already in place" in capsys.readouterr().out


def test_a_replaced_folder_whose_removal_was_stopped_is_never_restored(cub_root, monkeypatch, capsys):
    """Ctrl-C in the removal of the folder --force replaced left part of it as .cub.old, which a later run
    (after the user removed cub) restored and called 'already in place'. It is removed under another name now."""
    images = len(list((cub_root / "cub").rglob("*.jpg")))
    _placed_cub(cub_root, cub_root)
    rmtree = download_module.shutil.rmtree
    stopped: list[str] = []

    def stopped_half_way(path, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        if str(path).endswith(".cub.deleting") and Path(path).exists() and not stopped:
            stopped.append(str(path))
            victims = sorted(p for p in Path(path).rglob("*.jpg"))
            for victim in victims[: len(victims) // 2]:
                victim.unlink()  # half of it deleted...
            raise KeyboardInterrupt  # ...then Ctrl-C
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(download_module.shutil, "rmtree", stopped_half_way)
    with pytest.raises(KeyboardInterrupt):
        main(["data", "download", "cub", "--data-root", str(cub_root), "--force", *FAST])
    assert stopped and (cub_root / "cub" / SOURCE_FILE).is_file() and not (cub_root / ".cub.old").exists()
    monkeypatch.setattr(download_module.shutil, "rmtree", rmtree)
    rmtree(cub_root / "cub")  # the user removes the dataset to get a fresh copy
    capsys.readouterr()
    assert main(["data", "download", "cub", "--data-root", str(cub_root), *FAST]) == 0
    assert "Restoring" not in capsys.readouterr().err
    assert (cub_root / "cub" / SOURCE_FILE).is_file() and not list(cub_root.glob(".cub.*"))
    assert len(list((cub_root / "cub").rglob("*.jpg"))) == images  # a fresh, whole copy
