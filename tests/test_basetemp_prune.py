"""The old runs' temporary folders are removed at the session's start (tests/conftest.py
``prune_old_basetemps``, started by ``pytest_sessionstart``), by pytest's own rules: the ``keep`` newest
``pytest-N`` folders stay, and so does any folder whose lock a live session holds."""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType

import pytest


def _conftest(config: pytest.Config) -> ModuleType:
    """The suite's tests/conftest.py as pytest loaded it (``--import-mode=importlib`` leaves it unimportable)."""
    here = Path(__file__).with_name("conftest.py")
    return next(p for p in config.pluginmanager.get_plugins() if getattr(p, "__file__", None) == str(here))


def _runs(root: Path, numbers: range) -> None:
    for n in numbers:
        folder = root / f"pytest-{n}" / "popen-gw0" / "test_x0"
        folder.mkdir(parents=True)
        (folder / "teacher.pth").write_bytes(b"weights")


def test_all_but_the_newest_runs_are_removed(pytestconfig: pytest.Config, tmp_path: Path) -> None:
    _runs(tmp_path, range(1, 6))
    removed = _conftest(pytestconfig).prune_old_basetemps(tmp_path, 3, time.time() - 3600)
    assert sorted(p.name for p in removed) == ["pytest-1", "pytest-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytest-3", "pytest-4", "pytest-5"]
    assert (tmp_path / "pytest-3" / "popen-gw0" / "test_x0" / "teacher.pth").read_bytes() == b"weights"


def test_a_folder_locked_by_a_live_session_stays(pytestconfig: pytest.Config, tmp_path: Path) -> None:
    _runs(tmp_path, range(1, 6))
    (tmp_path / "pytest-1" / ".lock").write_text("4242")  # fresh: its session may still run
    _conftest(pytestconfig).prune_old_basetemps(tmp_path, 3, time.time() - 3600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytest-1", "pytest-3", "pytest-4", "pytest-5"]


def test_nothing_is_removed_when_nothing_is_kept(pytestconfig: pytest.Config, tmp_path: Path) -> None:
    """Retention policy "none" (keep 0): the current run's folder would be a candidate, so nothing is touched
    at the start; pytest removes them at the end as before."""
    _runs(tmp_path, range(1, 3))
    assert _conftest(pytestconfig).prune_old_basetemps(tmp_path, 0, time.time() - 3600) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytest-1", "pytest-2"]


def test_this_session_started_the_removal_in_its_controller(pytestconfig: pytest.Config) -> None:
    """The hook ran in the process that owns the run's folder (the controller, or a run without xdist); a
    worker leaves it to the controller."""
    conftest = _conftest(pytestconfig)
    if hasattr(pytestconfig, "workerinput") or pytestconfig.option.basetemp:
        assert conftest._early_prune is None
    else:
        assert conftest._early_prune is not None and conftest._early_prune.name == "prune-basetemps"
