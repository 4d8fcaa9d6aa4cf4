"""``raml export`` killed while it writes leaves its staging folder (``.<name>.<random>.staged``) next to the
target; the next export removes such folders, but never one that a running export holds."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from raml.cli import main as cli_main


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_the_next_export_removes_the_staging_folders_a_killed_one_left(random_network, tmp_path, capsys):
    checkpoint = random_network("timm/test_resnet", 8, 0)
    target = tmp_path / "student.pt"
    stale = tmp_path / ".student.pt.k1ll3d_x.staged"
    held = tmp_path / ".student.pt.runn1ng_.staged"
    other = tmp_path / ".other.pt.k1ll3d_x.staged"  # another target's: not this export's to remove
    for folder in (stale, held, other):
        folder.mkdir()
        (folder / "student.pt").write_bytes(b"partial model")
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running export holds its folder
        argv = ["export", "--network-path", str(checkpoint), "--image-size", "32", "--torchscript", str(target)]
        assert cli_main.main(argv) == 0, capsys.readouterr().err
    finally:
        os.close(fd)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([held.name, other.name, "student.pt", "student.pt.json"])
    assert (held / "student.pt").read_bytes() == b"partial model"


def test_a_new_staging_folder_is_locked_while_the_export_runs(tmp_path):
    from raml.deploy.export_stage import ExportStage

    target = tmp_path / "student.onnx"
    with ExportStage([target]) as stage:
        folder = stage.path(target).parent
        assert folder.name.startswith(".student.onnx.") and folder.name.endswith(".staged")
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        with ExportStage([target]):  # a second export beside it leaves the first one's folder alone
            assert folder.is_dir()
    assert list(Path(tmp_path).iterdir()) == []
