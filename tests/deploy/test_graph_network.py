"""The service's traced query network: kept only where it equals the eager network bit for bit, chosen by the
query size, and left out (with the reason logged) where tracing bakes in a batch size or fails."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from raml.deploy.service.embedders import TorchQueryEmbedder
from raml.deploy.service.graph_network import record_graphs
from raml.models import build_network
from raml.models.switchable_bn import enable_size_bn, switchable_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
ARCH = "timm/test_resnet"


def _network() -> nn.Module:
    torch.manual_seed(0)
    return build_network(ARCH, whitening=8, pretrained=False).eval()


def _multi_size_network() -> nn.Module:
    """Per-size BatchNorm statistics that differ between 24 and 32 px (so one size's graph is wrong at the other)."""
    network = enable_size_bn(_network(), [24, 32])
    generator = torch.Generator().manual_seed(1)
    for layer in switchable_layers(network):
        mean, var = layer.stats_for(24)
        mean.add_(0.3 * torch.randn(mean.shape, generator=generator))
        var.mul_(1.5)
    network.meta["image_sizes"] = [24, 32]
    return network


class _BatchBaked(nn.Module):
    """A forward that reads the batch size as a Python number: a trace at batch 2 is wrong at any other."""

    meta: dict = {}

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x).mean(dim=(2, 3))
        return out * (1.0 if int(x.shape[0]) == 2 else 2.0)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> dict:
        return {"embedding": self.conv(x).mean(dim=(2, 3)), "note": object()}


def test_the_graph_equals_the_network_bit_for_bit_at_batch_sizes_it_was_not_probed_with():
    network = _network()
    graphs = record_graphs(network, [32, 40], CPU)
    assert sorted(graphs) == [32, 40]
    with torch.inference_mode():
        for size in (32, 40):
            for batch in (1, 5, 17):
                x = torch.randn(batch, 3, size, size)
                assert torch.equal(graphs[size](x), network(x))


def test_each_size_has_its_own_graph_and_the_embedder_picks_it_by_the_query_size():
    network = _multi_size_network()
    embedder = TorchQueryEmbedder(network, CPU, None, channels_last=False)
    assert sorted(embedder.graphs) == [24, 32] and embedder.describe()["graph_sizes"] == [24, 32]
    for size in (24, 32):
        x = torch.randn(3, 3, size, size)
        with torch.inference_mode():
            expected = network(x).numpy()
        assert (embedder.embed(x) == expected).all()
    # the per-size statistics differ, so one size's graph run at the other size is wrong: the check has teeth
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert not torch.equal(embedder.graphs[24](x), network(x))


def test_the_embedder_runs_the_graph_not_the_network():
    network = _network()
    traced = TorchQueryEmbedder(network, CPU, 32)
    eager = TorchQueryEmbedder(network, CPU, 32, graph=False)
    x = torch.randn(4, 3, 32, 32)
    expected = eager.embed(x)
    assert eager.graphs == {} and eager.describe()["graph_sizes"] == []

    def broken(*args, **kwargs):
        raise AssertionError("the eager network was called")

    traced.network.forward = broken
    eager.network.forward = broken
    assert (traced.embed(x) == expected).all()
    with pytest.raises(AssertionError, match="eager network was called"):
        eager.embed(x)


@pytest.mark.parametrize("make", [_network, _multi_size_network])
def test_channels_last_serves_a_converted_copy_whose_graphs_equal_it_and_the_network_to_rounding(make):
    """With ``channels_last`` the embedder serves a channels-last copy (faster convolutions): its graphs equal that
    copy bit for bit, and its embeddings equal the network's own within float32 rounding; the caller's network
    keeps its format; by default the answers are the network's bit for bit."""
    network = make()
    served = TorchQueryEmbedder(network, CPU, None if make is _multi_size_network else 32, channels_last=True)
    plain = TorchQueryEmbedder(network, CPU, None if make is _multi_size_network else 32)
    assert served.describe()["memory_format"] == "channels_last" and plain.describe()["memory_format"] == "contiguous"
    assert served.network is not network and plain.network is network
    conv = next(m for m in network.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous()  # the caller's network is not converted
    copy_conv = next(m for m in served.network.modules() if isinstance(m, nn.Conv2d))
    assert copy_conv.weight.is_contiguous(memory_format=torch.channels_last) and not copy_conv.weight.is_contiguous()
    assert sorted(served.graphs) == sorted(plain.graphs) == sorted(served.sizes)
    for size in served.sizes:
        x = torch.randn(5, 3, size, size)
        with torch.inference_mode():
            own = network(x).numpy()
            converted = served.network(x).numpy()
        assert (served.embed(x) == converted).all()  # the graph equals the converted network
        assert (plain.embed(x) == own).all()
        np.testing.assert_allclose(served.embed(x), own, rtol=0, atol=1e-6)


def test_a_graph_that_baked_in_the_batch_size_is_left_out_and_the_network_answers(caplog):
    network = _BatchBaked().eval()
    with caplog.at_level(logging.WARNING, logger="raml.deploy.service.graph_network"):
        graphs = record_graphs(network, [16], CPU)
    assert graphs == {}
    assert "differs from the network" in caplog.text and "runs eagerly" in caplog.text


def test_a_network_that_cannot_be_traced_is_left_out_with_the_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="raml.deploy.service.graph_network"):
        graphs = record_graphs(_Untraceable().eval(), [16], CPU)
    assert graphs == {}
    assert "could not be traced" in caplog.text


def test_a_network_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        record_graphs(_network().train(), [32], CPU)
