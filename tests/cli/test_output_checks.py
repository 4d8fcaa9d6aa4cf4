"""Every file a command writes is checked before any work (a folder, a missing or unwritable folder, a file it
must not replace), and a failure never replaces what was there: ``raml extract``'s ``.npy`` and sidecar,
``raml export``'s models and sidecars, and the ``--json`` report of each command."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

import raml.utils
from raml.cli import extract as extract_module
from raml.cli.main import main
from raml.entry import check_output_file, check_output_files


@pytest.fixture(scope="module")
def network(random_network) -> Path:
    """A 16-d resnet18 checkpoint with random weights, shared by the session (the tests only read it)."""
    return random_network("resnet18", 16, 0)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"raml {command}: error: "), err
    return err


# ------------------------------------------------------------------------------------------- the helper


def test_check_output_file_accepts_a_new_file_in_a_missing_folder_and_leaves_nothing(tmp_path: Path):
    target = tmp_path / "new" / "deeper" / "out.json"
    assert check_output_file(target, "--json") == target
    assert list(tmp_path.iterdir()) == []  # no probe file left, no folder made


def test_check_output_file_refusals(tmp_path: Path):
    folder = tmp_path / "runs"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"--json '.*runs' is a folder"):
        check_output_file(folder, "--json")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with pytest.raises(ValueError, match=r"--json '.*plain.txt/a/out.json': '.*plain.txt' is not a folder"):
        check_output_file(plain / "a" / "out.json", "--json")
    check_output_file(plain, "--json")  # a report may be replaced
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_output_file(plain, "--output", overwrite=False)
    check_output_file(plain, "--output", overwrite=True)
    with pytest.raises(ValueError, match="--output and --json name the same file"):
        check_output_files([("--output", tmp_path / "a.json", None), ("--json", tmp_path / "x/../a.json", None)])
    (tmp_path / "linked").symlink_to(tmp_path, target_is_directory=True)  # the same folder under another name
    with pytest.raises(ValueError, match="--output and --json name the same file"):
        check_output_files([("--output", tmp_path / "a.json", None), ("--json", tmp_path / "linked/a.json", None)])
    assert plain.read_text() == "x"


def test_check_output_file_tries_a_real_file(tmp_path: Path, monkeypatch):
    """A folder that os.access calls writable can still refuse a file (read-only mount, no space, no inodes)."""

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=r"--json '.*out.json': cannot create a file in .*Read-only file system"):
        check_output_file(tmp_path / "out.json", "--json")


def test_check_output_file_refuses_an_unwritable_folder(tmp_path: Path):
    """A folder without write permission; as root (whom permissions do not stop: CI runs as root) a folder made
    immutable with chattr +i, which stops root too."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    immutable = os.geteuid() == 0
    if immutable:
        made = subprocess.run(["chattr", "+i", str(locked)], capture_output=True, text=True, check=False)
        if made.returncode != 0:
            pytest.skip(f"root ignores permissions and chattr +i failed here: {made.stderr.strip()}")
    try:
        with pytest.raises(ValueError, match="is not writable"):
            check_output_file(locked / "out.json", "--json")
        assert not any(locked.iterdir())
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=False)
        locked.chmod(0o700)


# ------------------------------------------------------------------------------------------- raml extract


def _extract(cub_root: Path, network: Path, output: Path, *extra: str) -> int:
    argv = ["extract", "--network-path", str(network), "--dataset", "cub-test", "--data-root", str(cub_root)]
    argv += ["--image-size", "32", "--workers", "0", "--device", "cpu", "--no-progress", "--no-cache"]
    return main([*argv, "--output", str(output), *extra])


def test_extract_with_a_folder_as_sidecar_keeps_the_previous_npy(cub_root: Path, network: Path, tmp_path, capsys):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "e3.json").mkdir()
    (out / "e3.npy").write_bytes(b"old embeddings")
    before = _snapshot(out)
    assert _extract(cub_root, network, out / "e3.npy", "--overwrite") == 2
    err = _error(capsys, "extract")
    assert "--output's sidecar" in err and "e3.json' is a folder" in err
    assert _snapshot(out) == before


def test_extract_refuses_to_replace_files_without_overwrite(cub_root: Path, network: Path, tmp_path, capsys):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "emb.json").write_text("an unrelated file\n")
    before = _snapshot(out)
    assert _extract(cub_root, network, out / "emb.npy") == 2
    err = _error(capsys, "extract")
    assert "--output's sidecar" in err and "emb.json' exists; pass --overwrite" in err
    assert _snapshot(out) == before
    (out / "emb.json").unlink()
    (out / "emb.npy").write_bytes(b"old embeddings")
    assert _extract(cub_root, network, out / "emb.npy") == 2
    assert "--output '" in _error(capsys, "extract") and (out / "emb.npy").read_bytes() == b"old embeddings"
    # --overwrite replaces both
    assert _extract(cub_root, network, out / "emb.npy", "--overwrite") == 0
    rows = np.load(out / "emb.npy")
    assert rows.shape[1] == 16 and json.loads((out / "emb.json").read_text())["shape"] == list(rows.shape)


def test_extract_output_in_a_file_or_missing_folder(cub_root: Path, network: Path, tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    assert _extract(cub_root, network, tmp_path / "plain" / "e.npy") == 2
    assert "'plain' is not a folder" in _error(capsys, "extract").replace(str(tmp_path) + os.sep, "")
    assert _extract(cub_root, network, tmp_path / "new" / "e.npy") == 0  # a missing folder is made
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["e.json", "e.npy"]


def test_extract_pair_write_failure_keeps_the_previous_pair(tmp_path: Path, monkeypatch):
    output, sidecar = tmp_path / "e.npy", tmp_path / "e.json"
    output.write_bytes(b"old npy")
    sidecar.write_text("old json")

    class BrokenJson:
        @staticmethod
        def dumps(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(extract_module, "json", BrokenJson)
    with pytest.raises(OSError, match="No space"):
        extract_module.write_pair(np.ones((2, 3), np.float32), {}, output, sidecar)
    assert output.read_bytes() == b"old npy" and sidecar.read_text() == "old json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.npy"]  # no temporary file left


def test_extract_pair_renames_the_sidecar_before_the_npy(tmp_path: Path, monkeypatch):
    renamed: list[str] = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(raml.utils.os, "replace", recording_replace)
    extract_module.write_pair(np.ones((2, 3), np.float32), {"shape": [2, 3]}, tmp_path / "e.npy", tmp_path / "e.json")
    assert renamed == ["e.json", "e.npy"]
    assert np.load(tmp_path / "e.npy").shape == (2, 3)


# ------------------------------------------------------------------------------------------- raml export


def _export(network: Path, *extra: str) -> int:
    return main(["export", "--network-path", str(network), "--image-size", "16", *extra])


def test_export_with_a_folder_as_json_keeps_the_previous_model(network: Path, tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "keep.onnx").write_text("precious\n")
    (exp / "keep.onnx.json").write_text("precious sidecar\n")
    (tmp_path / "runs").mkdir()
    before = _snapshot(tmp_path)
    assert _export(network, "--output", str(exp / "keep.onnx"), "--json", str(tmp_path / "runs"), "--overwrite") == 2
    assert "--json '" in _error(capsys, "export") and _snapshot(tmp_path) == before
    ts = ["--output", str(exp / "keep.onnx"), "--torchscript", str(tmp_path / "runs"), "--overwrite"]
    assert _export(network, *ts) == 2
    assert "--torchscript '" in _error(capsys, "export") and _snapshot(tmp_path) == before
    (tmp_path / "m.pt.json").mkdir()
    assert _export(network, "--torchscript", str(tmp_path / "m.pt")) == 2
    assert "--torchscript's sidecar" in _error(capsys, "export") and _snapshot(tmp_path) == before | {"m.pt.json": None}


def test_export_refuses_existing_files_without_overwrite(network: Path, tmp_path, capsys):
    (tmp_path / "keep.onnx").write_text("precious\n")
    before = _snapshot(tmp_path)
    assert _export(network, "--output", str(tmp_path / "keep.onnx")) == 2
    assert "keep.onnx' exists; pass --overwrite" in _error(capsys, "export")
    (tmp_path / "keep.onnx").unlink()
    (tmp_path / "keep.onnx.json").write_text("precious\n")
    before = _snapshot(tmp_path)
    assert _export(network, "--output", str(tmp_path / "keep.onnx")) == 2
    assert "--output's sidecar" in _error(capsys, "export") and _snapshot(tmp_path) == before
    # the report may not be one of the model files
    argv = ["--output", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "m.onnx.json")]
    assert _export(network, *argv) == 2
    assert "name the same file" in _error(capsys, "export") and _snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------- --json of each command


def _json_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "kept.txt").write_text("kept\n")
    return folder


def test_test_and_check_data_refuse_a_json_folder_first(cub_root: Path, network: Path, tmp_path, capsys):
    folder = _json_folder(tmp_path)
    before = _snapshot(tmp_path)
    argv = ["test", "--datasets", "cub-test", "--data-root", str(cub_root), "--sym", "--student-path", str(network)]
    assert main([*argv, "--image-size", "32", "--device", "cpu", "--workers", "0", "--json", str(folder)]) == 2
    assert f"--json '{folder}' is a folder" in _error(capsys, "test")
    assert main(["check-data", "--datasets", "cub-test", "--data-root", str(cub_root), "--json", str(folder)]) == 2
    assert f"--json '{folder}' is a folder" in _error(capsys, "check-data")
    assert _snapshot(tmp_path) == before


def test_index_and_search_refuse_a_json_folder_before_any_work(cub_root: Path, network: Path, tmp_path, capsys):
    pytest.importorskip("faiss")
    folder = _json_folder(tmp_path)
    before = _snapshot(tmp_path)
    index_dir = tmp_path / "index"
    argv = ["index", "--network-path", str(network), "--image-size", "32", "--data-root", str(cub_root)]
    argv += ["--dataset", "cub-test", "--output", str(index_dir), "--workers", "0", "--device", "cpu"]
    assert main([*argv, "--no-progress", "--json", str(folder)]) == 2
    assert f"--json '{folder}' is a folder" in _error(capsys, "index")
    assert not index_dir.exists() and _snapshot(tmp_path) == before  # nothing committed
    image = tmp_path / "query.jpg"  # refused before the query is read
    argv = ["search", "--network-path", str(network), "--index", str(index_dir), "--device", "cpu"]
    assert main([*argv, "--json", str(folder / "kept.txt" / "r.json"), str(image)]) == 2
    assert "kept.txt' is not a folder" in _error(capsys, "search")
    assert _snapshot(tmp_path) == before


def test_train_refuses_a_json_folder_before_training(cub_root: Path, network: Path, tmp_path, capsys):
    folder = _json_folder(tmp_path)
    before = _snapshot(tmp_path)
    argv = ["train", "-d", "cub", "-spath", str(network), "-tpath", str(network), "--data-root", str(cub_root)]
    argv += ["--directory", str(tmp_path / "run"), "--device", "cpu", "-j", "0", "--no-progress"]
    assert main([*argv, "--json", str(folder)]) == 2
    assert f"--json '{folder}' is a folder" in _error(capsys, "train")
    config = tmp_path / "config.yaml"
    config.write_text(f"json: {folder}\n")
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as stop:  # a YAML file does not give --json (one invocation's setting)
        main([*argv, "--config", str(config)])
    assert stop.value.code == 2 and "is a setting of one invocation" in _error(capsys, "train")
    assert _snapshot(tmp_path) == before  # no run folder, no checkpoint


def test_reproduce_and_demo_refuse_an_out_that_is_a_file(tmp_path: Path, capsys):
    plain = tmp_path / "plain"
    plain.write_text("kept\n")
    assert main(["reproduce", "cub", "--data-root", str(tmp_path / "data"), "--out", str(plain)]) == 2
    assert "--out's reproduce.json" in _error(capsys, "reproduce")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "results.json").mkdir()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 2
    assert "--out's results.json" in _error(capsys, "demo")
    assert plain.read_text() == "kept\n" and not (tmp_path / "data").exists()
