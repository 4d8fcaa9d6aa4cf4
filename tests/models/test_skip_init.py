"""``raml.models.skip_init``: torch.nn.init's initialisers pass through in the calling thread inside the block, work
as usual everywhere else, and are restored after; a checkpoint's load draws no random weights yet rebuilds every
one of them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from raml.models import build_network, load_network, save_checkpoint
from raml.models.skip_init import INITIALISERS, weight_init_skipped

ORIGINALS = {name: getattr(torch.nn.init, name) for name in INITIALISERS}
EXTRA_ARGS = {"constant_": (0.5,), "sparse_": (0.5,)}


def _tensor(name: str) -> torch.Tensor:
    return torch.full((4, 4, 3) if name == "dirac_" else (4, 4), 7.0)


@pytest.mark.parametrize("name", INITIALISERS)
def test_an_initialiser_leaves_its_tensor_inside_the_block_and_is_the_original_after(name):
    with weight_init_skipped():
        tensor = _tensor(name)
        assert getattr(torch.nn.init, name)(tensor, *EXTRA_ARGS.get(name, ())) is tensor
        assert torch.equal(tensor, _tensor(name))
    assert getattr(torch.nn.init, name) is ORIGINALS[name]
    changed = _tensor(name)
    getattr(torch.nn.init, name)(changed, *EXTRA_ARGS.get(name, ()))
    assert not torch.equal(changed, _tensor(name))  # outside, it initialises


def test_another_thread_initialises_as_usual_while_a_block_is_open():
    expected = ORIGINALS["kaiming_uniform_"](torch.empty(8, 8), generator=torch.Generator().manual_seed(3))
    opened, done = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def other_thread() -> None:
        opened.wait(timeout=10)
        seen["weights"] = torch.nn.init.kaiming_uniform_(torch.empty(8, 8), generator=torch.Generator().manual_seed(3))
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with weight_init_skipped():
        assert torch.nn.init.kaiming_uniform_ is not ORIGINALS["kaiming_uniform_"]  # the wrapper is in place
        opened.set()
        assert done.wait(timeout=10)
    worker.join(timeout=10)
    torch.testing.assert_close(seen["weights"], expected, rtol=0, atol=0)


def test_nested_and_failing_blocks_restore_the_initialisers():
    tensor = torch.full((3, 3), 2.0)
    with pytest.raises(RuntimeError, match="inside"), weight_init_skipped():
        with weight_init_skipped():
            pass
        torch.nn.init.normal_(tensor)  # the outer block still skips
        assert torch.equal(tensor, torch.full((3, 3), 2.0))
        raise RuntimeError("inside")
    assert all(getattr(torch.nn.init, name) is original for name, original in ORIGINALS.items())
    torch.nn.init.normal_(tensor)
    assert not torch.equal(tensor, torch.full((3, 3), 2.0))


@pytest.mark.parametrize("architecture", ["resnet18", "test_resnet"])
def test_a_checkpoint_load_draws_no_random_weights_and_rebuilds_every_one(architecture, tmp_path: Path):
    torch.manual_seed(0)
    network = build_network(architecture, whitening=8, pretrained=False)
    path = tmp_path / "net.pth"
    save_checkpoint(path, network)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    loaded = load_network(path)
    assert torch.equal(torch.get_rng_state(), state)  # nothing was drawn: no random initialisation ran
    saved, rebuilt = network.state_dict(), loaded.state_dict()
    assert list(rebuilt) == list(saved)
    for key, value in saved.items():
        torch.testing.assert_close(rebuilt[key], value, rtol=0, atol=0, msg=key)
    assert all(getattr(torch.nn.init, name) is original for name, original in ORIGINALS.items())
