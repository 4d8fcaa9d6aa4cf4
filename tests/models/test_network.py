"""Backbones (torchvision, timm) and the embedding network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from raml.models import EmbeddingNetwork, build_backbone, build_network
from raml.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TimmTrunk,
    TorchvisionViTTrunk,
    _torchvision_trunk,
)
from raml.models.network import l2_normalize

EPS = 1e-6  # the reference's L2N: x / (||x|| + eps)


@pytest.fixture(scope="module")
def resnet18_network() -> EmbeddingNetwork:
    torch.manual_seed(0)
    return build_network("resnet18", pooling="gem", whitening=16, pretrained=False).eval()


def test_resnet_backbone_uses_reference_key_layout(resnet18_network: EmbeddingNetwork) -> None:
    backbone = resnet18_network.backbone
    prefixes = sorted({key.split(".")[0] for key in backbone.state_dict()})
    assert prefixes == ["0", "1", "4", "5", "6", "7"]  # conv1, bn1, layer1..4 (relu, maxpool: no params)
    reference = torchvision.models.resnet18(weights=None)
    assert backbone[0].weight.shape == reference.conv1.weight.shape
    assert isinstance(backbone[7], type(reference.layer4))
    # Loading our keys into torchvision's resnet (renamed) is strict apart from the dropped fc head.
    result = reference.load_state_dict(_resnet_keys(backbone.state_dict()), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["fc.weight", "fc.bias"]

    reference.eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            y = layer(y)
        torch.testing.assert_close(backbone(x), y)


def test_build_backbone_resnet18() -> None:
    backbone = build_backbone("resnet18", pretrained=False)
    assert backbone.source == "torchvision" and backbone.channels == 512
    assert backbone.mean == IMAGENET_MEAN and backbone.std == IMAGENET_STD


def _resnet_keys(state_dict: dict) -> dict:
    names = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
    return {names[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in state_dict.items()}


def test_torchvision_features_trunk() -> None:
    name = "efficientnet_b0"  # convnext_tiny, vgg, mobilenet take the same path; one is enough here
    network = build_network(name, whitening=8, pretrained=False).eval()
    model = torchvision.models.get_model(name, weights=None)
    assert network.backbone is not None
    assert set(network.backbone.state_dict()) == {
        k[len("features.") :] for k in model.state_dict() if k.startswith("features.")
    }
    with torch.no_grad():
        out = network(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 8)


def test_densenet_trunk_ends_with_relu() -> None:
    tiny = torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2)
    trunk = _torchvision_trunk("densenet_tiny", tiny)
    assert isinstance(list(trunk.children())[-1], nn.ReLU)
    with torch.no_grad():
        assert trunk.eval()(torch.rand(1, 3, 32, 32)).min() >= 0


@pytest.mark.parametrize(
    ("name", "channels"),
    [("test_resnet", 96), ("test_convnext", 64), ("test_efficientnet", 256), ("test_vit", 64)],
)
def test_timm_backbones_give_maps_at_two_sizes(name: str, channels: int) -> None:
    backbone = build_backbone(name, pretrained=False)
    assert backbone.source == "timm" and backbone.channels == channels
    module = backbone.module.eval()
    with torch.no_grad():
        small, large = module(torch.rand(2, 3, 32, 32)), module(torch.rand(2, 3, 64, 64))
    assert small.dim() == 4 and small.shape[:2] == (2, channels)
    assert large.shape[:2] == (2, channels)
    assert large.shape[2] * large.shape[3] > small.shape[2] * small.shape[3]


def test_timm_mean_std_come_from_pretrained_cfg() -> None:
    vit = build_backbone("test_vit", pretrained=False)
    assert vit.mean == tuple(vit.module.model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    effnet = build_backbone("test_efficientnet", pretrained=False)
    assert effnet.mean == IMAGENET_MEAN


def test_vit_network_at_two_sizes_and_token_layout() -> None:
    torch.manual_seed(2)
    network = build_network("test_vit", pooling="spoc", whitening=0, pretrained=False).eval()
    assert isinstance(network.backbone, TimmTrunk)
    for size in (32, 64):
        with torch.no_grad():
            out = network(torch.rand(3, 3, size, size))
        assert out.shape == (3, network.output_dim) == (3, 64)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    # The map is the patch tokens (prefix token dropped) laid out row by row.
    x = torch.rand(1, 3, 64, 48)
    with torch.no_grad():
        tokens = network.backbone.model.forward_features(x)
        feature_map = network.backbone(x)
    assert feature_map.shape == (1, 64, 4, 3)
    prefix = network.backbone.model.num_prefix_tokens
    torch.testing.assert_close(feature_map[0, :, 1, 2], tokens[0, prefix + 1 * 3 + 2])


def test_timm_prefix_forces_timm() -> None:
    backbone = build_backbone("timm/resnet18", pretrained=False)
    assert backbone.source == "timm" and backbone.channels == 512
    assert build_backbone("torchvision/resnet18", pretrained=False).source == "torchvision"


@pytest.mark.parametrize("name", ["resnet18", "torchvision/resnet18"])
def test_a_torchvision_backbone_never_asks_timm(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """timm is imported where a name needs it (its registry, a timm model): a torchvision backbone, the paper's
    ResNets among them, is built without it (~0.8 s of every process's start-up here)."""
    import raml.models.backbones as backbones

    def no_timm() -> tuple[str, ...]:
        raise AssertionError("timm's registry was asked for a torchvision backbone")

    monkeypatch.setattr(backbones, "timm_model_names", no_timm)
    assert build_backbone(name, pretrained=False).source == "torchvision"
    with pytest.raises(AssertionError, match="timm's registry"):  # a timm name still asks it
        build_backbone("test_resnet", pretrained=False)


@pytest.mark.parametrize("name", ["resnet5O", "torchvision/test_vit", "timm/not_a_model", ""])
def test_unknown_architecture_error(name: str) -> None:
    with pytest.raises(ValueError, match="neither a torchvision model|non-empty"):
        build_backbone(name, pretrained=False)


def test_unknown_architecture_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"Close matches: .*resnet50"):
        build_backbone("resnet5O", pretrained=False)


def _tiny_torchvision_vit(seed: int = 0) -> torchvision.models.VisionTransformer:
    torch.manual_seed(seed)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    with torch.no_grad():  # torchvision initialises the position embeddings nearly flat; make them matter
        vit.encoder.pos_embedding.normal_(0, 1)
    return vit.eval()


def test_torchvision_vit_tokens_equal_torchvision_at_its_size() -> None:
    vit = _tiny_torchvision_vit()
    trunk = _torchvision_trunk("vit_tiny", vit)
    assert isinstance(trunk, TorchvisionViTTrunk)
    assert not any(key.startswith("heads") for key in trunk.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit._process_input(x)
        tokens = vit.encoder(torch.cat([vit.class_token.expand(2, -1, -1), tokens], dim=1))
        feature_map = trunk(x)
    assert feature_map.shape == (2, 16, 4, 4)
    # patch (row 1, column 2) is token 1 + 1 * 4 + 2 (the class token comes first)
    torch.testing.assert_close(feature_map[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])
    torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), tokens[:, 1:])


def test_torchvision_vit_resamples_position_embeddings_like_timm() -> None:
    from timm.layers import resample_abs_pos_embed

    vit = _tiny_torchvision_vit(seed=1)
    trunk = _torchvision_trunk("vit_tiny", vit)
    expected = resample_abs_pos_embed(vit.encoder.pos_embedding, (6, 5), (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(trunk.position_embedding(6, 5), expected)
    x = torch.rand(1, 3, 48, 40)
    with torch.no_grad():
        tokens = torch.cat([vit.class_token, vit.conv_proj(x).flatten(2).transpose(1, 2)], dim=1) + expected
        tokens = vit.encoder.ln(vit.encoder.layers(tokens))
        feature_map = trunk(x)
    assert feature_map.shape == (1, 16, 6, 5)
    torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), tokens[:, 1:])


def test_torchvision_vit_by_name_builds_a_network(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``vit_b_16`` goes through the ViT trunk (a tiny ViT stands in for the 86M-parameter one)."""
    from raml.models import load_network, save_checkpoint

    built = []

    def tiny_get_model(name: str, weights=None):
        built.append((name, weights))
        return _tiny_torchvision_vit(seed=2)

    monkeypatch.setattr(torchvision.models, "get_model", tiny_get_model)
    network = build_network("vit_b_16", pooling="gem", whitening=8, pretrained=False).eval()
    assert built[0] == ("vit_b_16", None)
    assert isinstance(network.backbone, TorchvisionViTTrunk) and network.meta["mean"] == list(IMAGENET_MEAN)
    for size in (32, 64):
        with torch.no_grad():
            out = network(torch.rand(2, 3, size, size))
        assert out.shape == (2, 8) and torch.isfinite(out).all()
    path = tmp_path / "vit.pth"
    save_checkpoint(path, network)
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(load_network(path)(x), network(x), rtol=0, atol=0)


def test_torchvision_maxvit_is_refused_before_building() -> None:
    with pytest.raises(ValueError, match=r"'maxvit_t' .*fixed when it is built.*'swin_t'"):
        build_backbone("maxvit_t", pretrained=True)  # refused before any download


def test_probe_keeps_training_mode() -> None:
    backbone = build_backbone("test_resnet", pretrained=False)
    assert backbone.module.training


def test_network_forward_matches_manual_pipeline(resnet18_network: EmbeddingNetwork) -> None:
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = resnet18_network(x)
        feature_map = resnet18_network.backbone(x).double().numpy()
    p = resnet18_network.pool.p.item()
    weight = resnet18_network.whiten.weight.detach().double().numpy()
    bias = resnet18_network.whiten.bias.detach().double().numpy()
    expected = []
    for b in range(2):
        pooled = np.array(
            [np.mean(np.maximum(feature_map[b, c], 1e-6) ** p) ** (1 / p) for c in range(feature_map.shape[1])]
        )
        pooled /= np.linalg.norm(pooled) + EPS
        whitened = weight @ pooled + bias
        expected.append(whitened / (np.linalg.norm(whitened) + EPS))
    np.testing.assert_allclose(out.numpy(), np.stack(expected), atol=1e-5)


def test_l2_normalize_adds_the_reference_epsilon_to_the_norm() -> None:
    # ||x|| = 5e-6: x / (5e-6 + 1e-6) = (0.5, 0.6667); F.normalize (x / max(||x||, eps)) would give (0.6, 0.8)
    tiny = torch.tensor([[3e-6, 4e-6]], dtype=torch.float64)
    torch.testing.assert_close(l2_normalize(tiny), torch.tensor([[0.5, 4 / 6]], dtype=torch.float64))
    large = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(l2_normalize(large), large / (5 + EPS), rtol=0, atol=1e-15)
    torch.testing.assert_close(l2_normalize(torch.zeros(1, 3)), torch.zeros(1, 3))


def test_network_output_keeps_the_epsilon() -> None:
    """An embedding whose pre-normalisation norm is tiny shows the epsilon: (3, 4)e-6 -> (0.5, 0.667)."""
    network = build_network("test_resnet", pooling="gem", whitening=2, pretrained=False).eval()
    with torch.no_grad():
        network.whiten.weight.zero_()
        network.whiten.bias.copy_(torch.tensor([3e-6, 4e-6]))
        out = network(torch.rand(3, 3, 32, 32))
    torch.testing.assert_close(out, torch.tensor([[0.5, 4 / 6]]).expand(3, 2), rtol=0, atol=1e-6)


def test_network_meta_and_properties(resnet18_network: EmbeddingNetwork) -> None:
    meta = resnet18_network.meta
    assert meta == {
        "architecture": "resnet18",
        "pooling": "gem",
        "whitening": 16,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "outputdim": 16,
        "pretrained": False,
        "pretrained_weights": None,
    }
    assert resnet18_network.output_dim == 16
    assert resnet18_network.mean == IMAGENET_MEAN and resnet18_network.std == IMAGENET_STD
    keys = list(resnet18_network.state_dict())
    assert keys[0] == "backbone.0.weight" and keys[-3:] == ["pool.p", "whiten.weight", "whiten.bias"]
    assert isinstance(resnet18_network.whiten, nn.Linear) and resnet18_network.whiten.bias is not None


def test_network_without_whitening() -> None:
    network = build_network("test_resnet", pooling="mac", whitening=0, pretrained=False).eval()
    assert network.whiten is None and network.output_dim == 96
    assert "whiten.weight" not in network.state_dict()
    with torch.no_grad():
        out = network(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 96)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_gemmp_network_has_per_channel_p() -> None:
    network = build_network("test_resnet", pooling="gemmp", whitening=4, pretrained=False)
    assert network.state_dict()["pool.p"].shape == (96,)


@pytest.mark.parametrize("whitening", [-1, True, 2.5])
def test_bad_whitening_is_rejected(whitening) -> None:
    with pytest.raises(ValueError, match="whitening must be a non-negative int"):
        build_network("test_resnet", whitening=whitening, pretrained=False)


def test_unknown_pooling_in_network() -> None:
    with pytest.raises(ValueError, match="valid poolings"):
        build_network("test_resnet", pooling="rmac", pretrained=False)


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (2, 4, 32, 32)])
def test_forward_rejects_bad_input(resnet18_network: EmbeddingNetwork, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        resnet18_network(torch.rand(*shape))


def test_gradients_flow_to_all_parts() -> None:
    network = build_network("test_resnet", pooling="gem", whitening=4, pretrained=False).train()
    network(torch.rand(2, 3, 32, 32)).sum().backward()
    assert network.pool.p.grad is not None and network.whiten.weight.grad is not None
    assert any(p.grad is not None for p in network.backbone.parameters())
