"""``OrtForward``: the fp32 onnxruntime twin of a network (issue 21, item 2), checked against the network's own
forward written plainly (the eager PyTorch call), on tiny networks."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from raml.models import build_network
from raml.models.onnx_forward import OrtForward, OrtParityError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def network() -> nn.Module:
    torch.manual_seed(0)
    net = build_network("timm/test_resnet", pooling="gem", whitening=16, pretrained=False).eval()
    for module in net.modules():  # BatchNorm statistics far from the identity, so that they matter
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net


class _SizeDependent(nn.Module):
    """A forward whose Python reads the input's size (as per-size BatchNorm or a timm grid does): a graph traced
    at one size computes the wrong thing at another."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if x.shape[-1] > 40 else 0.5
        return self.conv(x).mean(dim=(2, 3)) * scale


class _ValueDependent(nn.Module):
    """A forward that branches on the input's values: the trace (of zeros) keeps one branch, so the graph
    differs from the network on real images."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.linear(x.mean(dim=(2, 3)))
        return pooled * 3.0 if bool(x.mean() > 0.1) else pooled


class _NotExportable(nn.Module):
    """A forward through numpy: the exporter cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.mean(dim=(2, 3)).numpy() * 2.0
        return self.linear(torch.from_numpy(values))


def test_onnxruntime_gives_the_networks_embeddings_at_each_size(network: nn.Module) -> None:
    ort = OrtForward(network)
    torch.manual_seed(1)
    with torch.inference_mode():
        for size in (32, 48):
            images = torch.randn(5, 3, size, size)
            expected = network(images)
            got = ort(images)
            assert got.dtype == torch.float32 and got.shape == expected.shape == (5, 16)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        # another batch size at a size already exported: the same graph (dynamic batch)
        images = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(ort(images), network(images), rtol=0, atol=1e-5)
    assert set(ort.checks) == {(3, 32, 32), (3, 48, 48)}
    assert all(diff is not None and diff <= 1e-5 for diff in ort.checks.values())
    assert ort.export_seconds > 0
    # what callers read from a network is the wrapped network's
    assert ort.meta is network.meta and ort.pool is network.pool and ort.output_dim == 16


def test_each_size_gets_its_own_graph() -> None:
    torch.manual_seed(0)
    net = _SizeDependent().eval()
    ort = OrtForward(net, strict=True)
    with torch.inference_mode():
        for size in (32, 48):
            images = torch.randn(2, 3, size, size)
            torch.testing.assert_close(ort(images), net(images), rtol=0, atol=1e-6)


def test_a_graph_that_differs_falls_back_or_raises(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net = _ValueDependent().eval()
    images = torch.rand(4, 3, 8, 8) + 0.5  # mean > 0.1: the branch the zeros of the trace did not take
    with torch.inference_mode():
        expected = net(images)
        with caplog.at_level(logging.WARNING):
            got = OrtForward(net)(images)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the network's own forward
        assert "differs from the network's" in caplog.text and "using PyTorch's forward" in caplog.text
        with pytest.raises(OrtParityError, match="differs from the network's by .* at 8x8.*--cpu-runtime torch"):
            OrtForward(net, strict=True)(images)


def test_a_network_that_cannot_be_exported_falls_back_or_raises(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net = _NotExportable().eval()
    images = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        fallback = OrtForward(net)
        with caplog.at_level(logging.WARNING):
            torch.testing.assert_close(fallback(images), net(images), rtol=0, atol=0)
        assert fallback.checks == {(3, 8, 8): None}
        assert "cannot run this network with onnxruntime at 8x8" in caplog.text
        with pytest.raises(OrtParityError, match="cannot run this network with onnxruntime at 8x8"):
            OrtForward(net, strict=True)(images)


def test_warmup_runs_pytorch_until_enough_pixels_went_through(network: nn.Module, monkeypatch) -> None:
    ort = OrtForward(network, warmup_pixels=2 * 32 * 32 + 1)
    exports = []
    real_export = ort._export
    monkeypatch.setattr(ort, "_export", lambda *key: exports.append(key) or real_export(*key))
    with torch.inference_mode():
        for _ in range(3):  # 2 images each: 2048 pixels, 4096, then the export
            ort(torch.randn(2, 3, 32, 32))
        assert exports == [(3, 32, 32)]
        ort(torch.randn(1, 3, 48, 48))  # another size counts its own pixels
    assert exports == [(3, 32, 32)] and ort._warmup == {(3, 32, 32): 4096, (3, 48, 48): 48 * 48}
    with pytest.raises(ValueError, match="warmup_pixels must be >= 0"):
        OrtForward(network, warmup_pixels=-1)


def test_gradients_and_autocast_run_the_network_itself(network: nn.Module) -> None:
    ort = OrtForward(network)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    ort(images).sum().backward()  # gradients enabled: the network, so they flow
    assert images.grad is not None and not ort.checks
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ort(images.detach()).dtype == torch.bfloat16  # under autocast: the network's bf16 forward
    assert not ort.checks  # nothing was exported
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(ort)


def test_a_known_job_size_decides_up_front(network: nn.Module) -> None:
    ort = OrtForward(network, warmup_pixels=2 * 32 * 32)
    with torch.inference_mode():
        ort.expect((3, 32, 32), 3)  # 3 images: less than twice the warm-up, PyTorch to the job's end
        for _ in range(3):
            ort(torch.randn(1, 3, 32, 32))
        assert not ort.checks and ort._warmup == {(3, 32, 32): 3 * 32 * 32}  # past the warm-up, not exported
        ort.expect((3, 32, 32), 4)  # the next job is twice the warm-up: exported on its first batch
        ort(torch.randn(2, 3, 32, 32))
        assert set(ort.checks) == {(3, 32, 32)} and ort._warmup == {(3, 32, 32): 3 * 32 * 32}
