"""Per-size BatchNorm statistics: estimated as a plain mean/variance would give them, chosen by the input's
size, kept through a checkpoint round trip, refused clearly by a plain network and by a dynamic export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from raml.data import EvalTransform, load_image
from raml.deploy import export_onnx
from raml.models import build_network, load_network, save_checkpoint
from raml.models.switchable_bn import (
    SwitchableBatchNorm2d,
    enable_size_bn,
    size_bn_sizes,
    strip_size_bn,
)
from raml.retrieval.size_bn import recalibrate_size_bn

ARCH = "timm/test_resnet"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("bn_images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _network() -> nn.Module:
    torch.manual_seed(0)
    return build_network(ARCH, whitening=8, pretrained=False).eval()


def test_enabling_changes_nothing_until_statistics_are_estimated():
    network = _network()
    x = torch.randn(2, 3, 24, 24)
    before = network(x)
    enable_size_bn(network, [24, 32])
    assert size_bn_sizes(network) == [24, 32] and network.meta["bn_sizes"] == [24, 32]
    assert all(isinstance(m, SwitchableBatchNorm2d) for m in network.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(network(x), before, rtol=0, atol=0)


def test_recalibrated_statistics_are_the_mean_and_variance_of_the_activations(images):
    network = _network()
    first_bn = next(m for m in network.modules() if isinstance(m, nn.BatchNorm2d))
    shared = (first_bn.running_mean.clone(), first_bn.running_var.clone())
    # independent: the first BN layer's input over all images at 24 px (one batch), plain mean and variance
    captured = []
    handle = first_bn.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    transform = EvalTransform(24, network.meta["mean"], network.meta["std"])
    with torch.no_grad():
        network(torch.stack([transform(load_image(p)) for p in images]))
    handle.remove()
    activations = captured[0].transpose(0, 1).flatten(1)  # (C, N*H*W)
    recalibrate_size_bn(network, images, [24, 32], torch.device("cpu"), batch_size=len(images))
    mean, var = first_bn.stats_for(24)
    torch.testing.assert_close(mean, activations.mean(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, activations.var(dim=1, unbiased=True), rtol=1e-4, atol=1e-5)
    # the shared statistics and the mode are restored
    torch.testing.assert_close(first_bn.running_mean, shared[0], rtol=0, atol=0)
    torch.testing.assert_close(first_bn.running_var, shared[1], rtol=0, atol=0)
    assert not network.training
    assert not torch.equal(first_bn.stats_for(24)[0], first_bn.stats_for(32)[0])


def _with_stats_of(network: nn.Module, size: int) -> nn.Module:
    """An independent plain network whose shared statistics are ``size``'s."""
    plain = _network()
    state = strip_size_bn(network.state_dict())
    for name, module in network.named_modules():
        if isinstance(module, SwitchableBatchNorm2d):
            mean, var = module.stats_for(size)
            state[f"{name}.running_mean"], state[f"{name}.running_var"] = mean, var
    plain.load_state_dict(state)
    return plain


def test_the_input_size_selects_the_statistics_and_other_sizes_use_the_shared_ones(images):
    network = recalibrate_size_bn(_network(), images, [24, 32], torch.device("cpu"))
    with torch.no_grad():
        for size in (24, 32):
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(network(x), _with_stats_of(network, size)(x))
        x = torch.randn(2, 3, 40, 40)  # not a trained size: the shared statistics
        torch.testing.assert_close(network(x), _network()(x))


def test_a_non_square_input_uses_the_shared_statistics_even_when_a_side_is_a_size(images):
    """Only a square input ``S x S`` selects ``S``'s statistics: 24 high and 32 wide (both sizes with their own)
    or 40 x 32 use the shared ones, i.e. compute what the plain network computes."""
    network = recalibrate_size_bn(_network(), images, [24, 32], torch.device("cpu"))
    plain = _network()
    with torch.no_grad():
        for height, width in ((24, 32), (40, 32), (32, 24)):
            x = torch.randn(2, 3, height, width)
            torch.testing.assert_close(network(x), plain(x))
            assert not torch.allclose(network(x), _with_stats_of(network, width)(x), atol=1e-4)


def test_checkpoint_round_trip_and_plain_loading(images, tmp_path):
    network = recalibrate_size_bn(_network(), images, [24, 32], torch.device("cpu"))
    path = tmp_path / "bn.pth"
    save_checkpoint(path, network)
    state = torch.load(path, weights_only=True)
    assert state["meta"]["bn_sizes"] == [24, 32]
    assert any(key.endswith(".running_mean_s24") for key in state["state_dict"])
    loaded = load_network(path)
    assert size_bn_sizes(loaded) == [24, 32]
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), network(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="running_mean_s24"):
        _network().load_state_dict(state["state_dict"])
    _network().load_state_dict(strip_size_bn(state["state_dict"]))  # the documented way to a plain network


def test_dynamic_export_of_per_size_statistics_is_refused(images, tmp_path):
    network = enable_size_bn(_network(), [24, 32])
    target = tmp_path / "bn.onnx"
    with pytest.raises(ValueError, match="one file per size"):
        export_onnx(network, 24, target, dynamic_size=True, check_sizes=[24, 32])
    assert not target.exists()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="positive"):
        enable_size_bn(_network(), [])
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        enable_size_bn(nn.Sequential(nn.Conv2d(3, 4, 3)), [24])
