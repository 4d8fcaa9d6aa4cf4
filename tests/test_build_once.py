"""The suite's ``build_once`` fixture (tests/conftest.py): an artefact made once per session, shared by the
pytest-xdist workers through a file lock (the training tests' dataset and teacher use it)."""

from __future__ import annotations

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
