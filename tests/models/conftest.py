"""Fixtures shared by the checkpoint-loading tests (test files cannot import each other)."""

from __future__ import annotations

from typing import Any

import pytest
import torch


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused file must never reach torch.load (which would allocate what it asks for)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", refuse)
