"""``--device`` of every command: one line naming the problem for a name torch does not know or a missing GPU."""

from __future__ import annotations

import pytest
import torch

from raml.utils import select_device


def test_known_names_resolve():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["bogus", "cpu:x", ""])
def test_a_name_that_is_no_device_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"is not a device name; use auto, cpu, cuda, cuda:N"):
        select_device(name)


def test_a_gpu_index_past_the_machines_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"has 1 CUDA device\(s\), numbered 0 to 0"):
        select_device("cuda:3")
    assert select_device("cuda:0") == torch.device("cuda", 0)
