"""A checkpoint whose ``meta`` values are not of the types the network is rebuilt from is refused with a
CheckpointError naming the file and the field, not a bare ValueError, TypeError or RecursionError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raml.models.checkpoints import CheckpointError, load_network, network_from_checkpoint


def _nested(depth: int) -> list:
    outer: list = []
    inner = outer
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return outer


BASE = {"architecture": "resnet18", "pooling": "gem"}


@pytest.mark.parametrize(
    ("fields", "refusal"),
    [
        ({"mean": ["a", "b", "c"]}, "mean must be three finite numbers (one per RGB channel), got ['a', 'b', 'c']"),
        ({"mean": 5}, "mean must be three finite numbers (one per RGB channel), got 5"),
        ({"std": [0.2, 0.0, 0.2]}, "std must be three positive finite numbers"),
        ({"std": [0.2, float("nan"), 0.2]}, "std must be three positive finite numbers"),
        ({"bn_sizes": "abc"}, "bn_sizes must be a list of positive integers (image sides), got 'abc'"),
        ({"image_sizes": [32, True]}, "image_sizes must be a list of positive integers"),
        ({"architecture": _nested(100_000)}, "architecture must be a name (a string), got [[[...]]]"),
        ({"pooling": 3}, "pooling must be a name (a string), got 3"),
    ],
)
def test_malformed_meta_fields_are_refused_naming_file_and_field(fields, refusal) -> None:
    with pytest.raises(CheckpointError, match=r"^crafted\.pth: its meta is malformed: ") as refused:
        network_from_checkpoint({"meta": {**BASE, **fields}, "state_dict": {}}, "crafted.pth")
    assert refusal in str(refused.value)


def test_a_malformed_meta_in_a_file_is_refused_by_load_network(tmp_path: Path) -> None:
    path = tmp_path / "bad_mean.pth"
    torch.save({"meta": {**BASE, "mean": ["a", "b", "c"]}, "state_dict": {"x": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=rf"{path.name}: its meta is malformed: mean must be"):
        load_network(path, data_root=tmp_path, download=False)


def test_well_typed_meta_fields_pass_the_check() -> None:
    """The check lets a well-typed meta through to the network build (which then finds the state dict empty)."""
    meta = {**BASE, "mean": [0.5, 0.5, 0.5], "std": (1, 1, 1), "bn_sizes": [], "image_sizes": [16, 32]}
    meta["whitening"] = True  # the reference's bool: not read from meta
    with pytest.raises(CheckpointError, match="state dict does not match"):
        network_from_checkpoint({"meta": meta, "state_dict": {}}, "fine.pth")
