"""Shared set-up of the deployment tests."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread_and_clean_logging():
    """One torch thread (steadier on a small shared machine); the root logger's handlers, which the CLI's
    setup_logging replaces, are restored afterwards."""
    threads = torch.get_num_threads()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    root.handlers[:] = handlers
    root.setLevel(level)
