"""The BatchNorm synchronisation of ``--train-bn`` under torchrun (:func:`raml.engine.trainer.convert_sync_batchnorm`):
every layer keeps what it computes and its state dict keys; a per-size BatchNorm student is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from raml.engine.trainer import convert_sync_batchnorm
from raml.models import build_network
from raml.models.switchable_bn import enable_size_bn


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet"])
def test_conversion_keeps_outputs_and_keys(arch: str) -> None:
    torch.manual_seed(0)
    network = build_network(arch, whitening=16, pretrained=False).eval()
    converted = convert_sync_batchnorm(copy.deepcopy(network)).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    assert list(converted.state_dict()) == list(network.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), network(x))


def test_per_size_batchnorm_student_is_refused() -> None:
    network = enable_size_bn(build_network("test_resnet", whitening=16, pretrained=False), [16, 32])
    keys = list(network.state_dict())
    with pytest.raises(ValueError, match=r"SwitchableBatchNorm2d.*sizes \[16, 32\].*leave out --train-bn"):
        convert_sync_batchnorm(network)
    assert list(network.state_dict()) == keys  # nothing was changed
