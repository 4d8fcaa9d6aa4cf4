"""``--resume-student`` refuses an optimizer state whose tensors ``optimizer.load_state_dict`` would materialise
beyond the run's own (a stride-0 view declaring millions of elements over one stored value, a state of another
shape than its parameter), before it is given them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from raml.engine.resume import check_optimizer_tensors
from raml.engine.trainer import Trainer
from raml.models.checkpoints import CheckpointError

CPU = torch.device("cpu")


def _stepped() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(2, 4)).sum().backward()
    optimizer.step()
    return net, optimizer


def test_a_saved_optimizer_state_passes() -> None:
    _, optimizer = _stepped()
    check_optimizer_tensors(optimizer.state_dict(), optimizer, Path("ok.pth"))


def test_a_stride0_state_declaring_more_than_its_storage_is_refused() -> None:
    _, optimizer = _stepped()
    saved = optimizer.state_dict()
    saved["state"][0]["exp_avg"] = torch.zeros(1, dtype=torch.float64).expand(3, 4)  # the parameter's shape
    with pytest.raises(CheckpointError, match=r"'exp_avg' of its parameter 0 declares 12 elements.*storage of 1"):
        check_optimizer_tensors(saved, optimizer, Path("bomb.pth"))


def test_a_state_of_another_shape_than_its_parameter_is_refused() -> None:
    _, optimizer = _stepped()
    saved = optimizer.state_dict()
    saved["state"][2]["exp_avg_sq"] = torch.zeros(7)
    refusal = r"'exp_avg_sq' of its parameter 2 has shape \(7\), the parameter \(2, 3\)"
    with pytest.raises(CheckpointError, match=refusal):
        check_optimizer_tensors(saved, optimizer, Path("other.pth"))


def test_resuming_a_checkpoint_with_a_stride0_optimizer_state_is_refused_before_loading_it(
    machinery, machinery_teacher_path, finished, tmp_path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    last = run / "model_last.pth.tar"
    checkpoint = torch.load(last, weights_only=True)
    entry = next(iter(checkpoint["optimizer"]["state"].values()))
    name = next(key for key, value in entry.items() if isinstance(value, torch.Tensor) and value.dim() > 0)
    entry[name] = torch.zeros(1, dtype=torch.float64).expand(10**6)
    torch.save(checkpoint, last)
    before = last.read_bytes()
    config = machinery.distill_config(
        run, machinery_teacher_path, epochs=2, val=False, scheduler="exponential", resume_student="last"
    )
    with pytest.raises(CheckpointError, match=r"declares 1000000 elements \(shape \(1000000\)\) over a storage of 1"):
        Trainer(config, CPU, progress=False)
    assert last.read_bytes() == before


@pytest.mark.parametrize(
    ("sizes", "shown"),
    [([[1]], "a list holding other values than positive integers"), (["a"], "a list holding"), ("ab", "'ab'")],
)
def test_a_checkpoint_of_malformed_image_sizes_is_refused_by_name(tmp_path, sizes, shown) -> None:
    from raml.engine.resume import load_resume_checkpoint

    path = tmp_path / "model_last.pth.tar"
    meta = {"architecture": "resnet18", "pooling": "gem", "image_sizes": sizes}
    torch.save({"meta": meta, "state_dict": {"x": torch.zeros(1)}, "raml": {"mode": "ts_aug"}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=rf"{path.name}: its meta's 'image_sizes' is {shown}"):
        load_resume_checkpoint(path)
