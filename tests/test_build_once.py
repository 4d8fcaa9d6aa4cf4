"""The suite's ``build_once`` fixture (tests/conftest.py): an artefact made once per session, shared by the
pytest-xdist workers through a file lock (the training tests' dataset and teacher use it)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest


def test_made_once_and_the_same_folder_for_every_caller(build_once):
    calls = []

    def make(folder: Path) -> None:
        calls.append(folder)
        (folder / "artefact").write_text("made")

    first = build_once("test-once-plain", make)
    second = build_once("test-once-plain", make)
    assert first == second and len(calls) == 1
    assert (first / "artefact").read_text() == "made"


def test_a_caller_waits_for_the_one_making_it(build_once):
    """Two callers at once (threads here; workers are processes, the lock is the same ``flock``): one makes
    it, the other waits and finds it made."""
    calls, folders = [], []

    def make(folder: Path) -> None:
        calls.append(folder)
        time.sleep(0.3)
        (folder / "artefact").write_text("made")

    def ask() -> None:
        folder = build_once("test-once-race", make)
        folders.append((folder / "artefact").read_text())

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and folders == ["made", "made"]


def test_a_failed_make_is_made_again_by_the_next_caller(build_once):
    def fail(folder: Path) -> None:
        (folder / "half").write_text("half")
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match="broken"):
        build_once("test-once-failed", fail)
    folder = build_once("test-once-failed", lambda folder: (folder / "artefact").write_text("made"))
    assert sorted(p.name for p in folder.iterdir()) == [".done", "artefact"]  # the half-made file is gone


@pytest.mark.parametrize("change", ["rewrite", "add", "remove"])
def test_a_shared_folder_changed_after_it_was_made_is_refused_naming_the_file(build_once, change):
    def make(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "artefact").write_text("made")

    folder = build_once(f"test-once-changed-{change}", make)
    if change == "rewrite":
        (folder / "sub" / "artefact").write_text("written by a test")
    elif change == "add":
        (folder / "notes.txt").write_text("mine")
    else:
        (folder / "sub" / "artefact").unlink()
    name = {"rewrite": "sub/artefact", "add": "notes.txt", "remove": "sub/artefact"}[change]
    with pytest.raises(RuntimeError, match=re.escape(f"changed after it was made ({name}): a test wrote into it")):
        build_once(f"test-once-changed-{change}", make)


def test_raml_s_embedding_cache_under_a_shared_data_root_is_not_a_change(build_once):
    folder = build_once("test-once-cache", lambda folder: (folder / "artefact").write_text("made"))
    (folder / "cache" / "embeddings").mkdir(parents=True)
    (folder / "cache" / "embeddings" / "0123.npy").write_bytes(b"cached")  # what raml test writes there
    assert build_once("test-once-cache", lambda folder: None) == folder
