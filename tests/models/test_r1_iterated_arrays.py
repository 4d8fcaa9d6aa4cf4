"""A pickle that passes one stored numpy array, tensor or list built from it to list() over and over builds an
object per element each time (a 1 MB file made 2.2 GB): refused before loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from raml.models import load_checkpoint_file
from raml.models.checkpoints import InvalidCheckpointError


class _Call:
    """Pickles as ``function(*args)``."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.function, self.args


def _refused(path: Path) -> None:
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(InvalidCheckpointError, match=r"not a valid checkpoint.*copied over and over"):
        load_checkpoint_file(path)


def test_list_of_a_stored_numpy_array_over_and_over_is_refused(tmp_path: Path, no_torch_load: None) -> None:
    array = np.zeros(4096, dtype=np.uint8)  # pickled once, then by reference: 4096 numpy scalars a call
    path = tmp_path / "arrays.pth"
    torch.save({"state_dict": {}, "x": [_Call(list, array) for _ in range(64)]}, path)
    _refused(path)


def test_list_of_a_list_built_from_stored_data_over_and_over_is_refused(tmp_path: Path, no_torch_load: None) -> None:
    built = _Call(list, np.zeros(4096, dtype=np.uint8))  # once: within the budget
    path = tmp_path / "lists.pth"
    torch.save({"state_dict": {}, "x": [_Call(tuple, built) for _ in range(64)]}, path)
    _refused(path)


def test_list_of_a_stored_tensor_over_and_over_is_refused(tmp_path: Path, no_torch_load: None) -> None:
    tensor = torch.zeros(4096, dtype=torch.uint8)  # a 0-d tensor (about 650 bytes) per element and call
    path = tmp_path / "tensors.pth"
    torch.save({"state_dict": {"w": tensor}, "x": [_Call(list, tensor) for _ in range(16)]}, path)
    _refused(path)


def test_tensors_and_arrays_stored_whole_still_load(tmp_path: Path) -> None:
    path = tmp_path / "honest.pth"
    tensor, array = torch.arange(4096.0), np.arange(4096.0)
    torch.save({"state_dict": {"w": tensor, "p": torch.nn.Parameter(tensor)}, "a": array, "b": [array, array]}, path)
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["state_dict"]["p"], tensor)
    assert np.array_equal(loaded["b"][1], array)
