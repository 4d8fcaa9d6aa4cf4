"""An honest checkpoint holding many numpy scalars (a loss history) loads: the size check charged each scalar an
object per character of its dtype's name (``dtype('f8')`` counted as 2 items), refusing it as data copied over and
over."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raml.models import load_checkpoint_file


def test_a_checkpoint_with_a_long_history_of_numpy_scalars_loads(tmp_path: Path) -> None:
    net = torch.nn.Linear(8, 4)
    history = [np.float64(i) for i in range(100_000)]  # about 5 MB, each scalar from the memoised dtype
    path = tmp_path / "history.pth"
    torch.save({"state_dict": net.state_dict(), "h": history, "best": np.float32(0.5)}, path)
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["state_dict"]["weight"], net.weight.detach())
    assert len(loaded["h"]) == 100_000 and loaded["h"][-1] == 99_999.0
    assert loaded["best"] == np.float32(0.5)
