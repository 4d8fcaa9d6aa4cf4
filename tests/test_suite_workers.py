"""How many pytest-xdist workers ``make test``'s ``-n auto`` starts (tests/conftest.py
``pytest_xdist_auto_num_workers``): one more than the CPUs this process may use, unless
``PYTEST_XDIST_AUTO_NUM_WORKERS`` says otherwise."""

from __future__ import annotations

import os

import pytest


def _auto_workers(config: pytest.Config) -> int:
    """What ``-n auto`` resolves to: xdist asks this hook (first answer wins) when it reads the option."""
    return config.hook.pytest_xdist_auto_num_workers(config=config)


def test_auto_is_one_worker_more_than_the_cpus(pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("xdist")
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    assert _auto_workers(pytestconfig) == len(os.sched_getaffinity(0)) + 1


def test_the_environment_variable_still_sets_the_count(
    pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "5")
    assert _auto_workers(pytestconfig) == 5
