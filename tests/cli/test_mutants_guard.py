"""Hand-mutation survivors of the output-vs-input guard (raml.entry.check_output_files / refuse_inputs), now
killed: an output that is an input under another name of the same file (a hard link), found by samefile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raml.entry import InputFiles, check_output_files, image_file_keys, refuse_inputs


def test_an_output_that_is_a_hard_link_of_an_input_is_refused(tmp_path: Path):
    checkpoint = tmp_path / "teacher.pth"
    checkpoint.write_bytes(b"weights")
    other_name = tmp_path / "report.json"
    os.link(checkpoint, other_name)  # one file, two names: neither real path nor name matches
    inputs = [("--network-path", checkpoint)]
    with pytest.raises(ValueError, match=r"--json '.*report.json' is --network-path's '.*teacher.pth', an input"):
        refuse_inputs([("--json", other_name, True)], inputs)
    with pytest.raises(ValueError, match=r"--network-path's"):
        check_output_files([("--json", other_name, True)], inputs)
    assert checkpoint.read_bytes() == b"weights"
    check_output_files([("--json", tmp_path / "new.json", None)], inputs)  # another file is fine


def test_an_output_at_the_missing_target_of_a_linked_input_is_refused(tmp_path: Path):
    """The input is a link whose target is not there (yet): an output written there would become the input."""
    (tmp_path / "linked.pth").symlink_to(tmp_path / "teacher.pth")
    inputs = [("--network-path", tmp_path / "linked.pth")]
    with pytest.raises(ValueError, match=r"--json '.*teacher.pth' is --network-path's '.*linked.pth'"):
        refuse_inputs([("--json", tmp_path / "teacher.pth", None)], inputs)
    assert not (tmp_path / "teacher.pth").exists()


def test_an_image_named_through_a_linked_folder_is_guarded_under_its_real_folder(tmp_path: Path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.jpg").write_bytes(b"an image")
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    images = InputFiles(
        "--list", "an image that --list 'l.txt' names", image_file_keys([tmp_path / "linked" / "a.jpg"])
    )
    with pytest.raises(ValueError, match=r"--json '.*real/a.jpg' is an image that --list 'l.txt' names"):
        check_output_files([("--json", real / "a.jpg", True)], [images])
    assert (real / "a.jpg").read_bytes() == b"an image"
