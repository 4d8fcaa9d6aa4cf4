"""Which ImageNet weights a backbone gets (``pretrained_weights``), and clear errors when they cannot be fetched.

Nothing is downloaded: torchvision's and timm's loaders are replaced by fakes that record what was asked for.
"""

from __future__ import annotations

import urllib.error
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from huggingface_hub.errors import LocalEntryNotFoundError

from raml.models import (
    DownloadError,
    build_backbone,
    build_network,
    load_network,
    resolve_timm_weights,
    resolve_torchvision_weights,
    save_checkpoint,
)


class _Requested(Exception):  # noqa: N818 - a signal, not an error
    """Raised by the fake loader: stops the build once the weights' URL is known."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def _stop_at_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(url: str, *args: object, **kwargs: object) -> dict:
        raise _Requested(url)

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake)


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache ($TORCH_HOME/hub), so that no cached weights are found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch" / "hub"


# ------------------------------------------------------------------------------ torchvision: which weights


@pytest.mark.parametrize(
    ("choice", "member"),
    [
        ("v1", "IMAGENET1K_V1"),
        ("V1", "IMAGENET1K_V1"),
        ("default", "IMAGENET1K_V2"),
        ("IMAGENET1K_V2", "IMAGENET1K_V2"),
        ("imagenet1k_v2", "IMAGENET1K_V2"),
        ("ResNet50_Weights.IMAGENET1K_V1", "IMAGENET1K_V1"),
    ],
)
def test_resolve_torchvision_weights(choice: str, member: str) -> None:
    weights = resolve_torchvision_weights("resnet50", choice)
    assert weights is torchvision.models.ResNet50_Weights[member]


def test_v1_and_default_differ_for_resnet50() -> None:
    assert str(resolve_torchvision_weights("resnet50")) == "ResNet50_Weights.IMAGENET1K_V1"
    assert resolve_torchvision_weights("resnet50").url.endswith("resnet50-0676ba61.pth")
    assert resolve_torchvision_weights("resnet50", "default").url.endswith("resnet50-11ad3fa6.pth")


@pytest.mark.parametrize("choice", ["IMAGENET1K_V3", "SWAG", "", "v2"])
def test_unknown_torchvision_weights_list_the_valid_names(choice: str) -> None:
    with pytest.raises(ValueError, match=r"valid values for 'resnet50' are 'v1', 'default', 'IMAGENET1K_V1', "):
        resolve_torchvision_weights("resnet50", choice)


def test_v1_is_refused_where_torchvision_has_no_v1() -> None:
    with pytest.raises(ValueError, match=r"'regnet_y_128gf' has no IMAGENET1K_V1.*'default', 'IMAGENET1K_SWAG_E2E_V1'"):
        resolve_torchvision_weights("regnet_y_128gf", "v1")
    assert resolve_torchvision_weights("regnet_y_128gf", "default").name == "IMAGENET1K_SWAG_E2E_V1"


@pytest.mark.parametrize("name", ["resnet50", "resnet18", "efficientnet_b1", "mobilenet_v2", "wide_resnet50_2"])
def test_v1_is_what_the_legacy_pretrained_true_loads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference calls ``torchvision.models.<name>(pretrained=True)``: it must ask for the same file."""
    _stop_at_download(monkeypatch)
    with warnings.catch_warnings(), torch.device("meta"), pytest.raises(_Requested) as legacy:
        warnings.simplefilter("ignore")  # torchvision deprecates pretrained=True
        torchvision.models.get_model_builder(name)(pretrained=True)
    assert legacy.value.url == resolve_torchvision_weights(name, "v1").url


def test_build_requests_v1_by_default_and_default_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    _stop_at_download(monkeypatch)
    with torch.device("meta"):
        with pytest.raises(_Requested) as v1:
            build_backbone("resnet50", pretrained=True)
        with pytest.raises(_Requested) as default:
            build_network("resnet50", pretrained=True, pretrained_weights="default")
    assert v1.value.url == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    assert default.value.url == torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url


def test_pretrained_weights_are_loaded_and_recorded_in_meta(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    torch.manual_seed(4)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()
    requested = []

    def fake(url: str, *args: object, **kwargs: object) -> dict:
        requested.append(url)
        return imagenet

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake)
    network = build_network("resnet18", whitening=8, pretrained=True)
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert network.meta["pretrained_weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    torch.testing.assert_close(network.backbone[0].weight, imagenet["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(network.backbone[7][1].bn2.running_var, imagenet["layer4.1.bn2.running_var"])

    path = tmp_path / "net.pth"
    save_checkpoint(path, network)
    assert load_network(path).meta["pretrained_weights"] == "ResNet18_Weights.IMAGENET1K_V1"


def test_random_weights_record_none_and_ignore_the_choice() -> None:
    network = build_network("resnet18", whitening=0, pretrained=False, pretrained_weights="IMAGENET1K_V9")
    assert network.meta["pretrained"] is False and network.meta["pretrained_weights"] is None
    assert build_backbone("test_resnet", pretrained=False).weights is None


# ------------------------------------------------------------------------------------- timm: which tag


@pytest.fixture
def timm_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace timm's weight loading by a recorder of the requested ``<arch>.<tag>``."""
    requested: list[str] = []

    def fake_load_pretrained(model: torch.nn.Module, pretrained_cfg: dict | None = None, **kwargs: object) -> None:
        cfg = pretrained_cfg or model.pretrained_cfg
        requested.append(f"{cfg['architecture']}.{cfg['tag']}")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", fake_load_pretrained)
    return requested


@pytest.mark.parametrize(
    ("name", "choice"),
    [("test_resnet", "v1"), ("test_resnet", "default"), ("test_resnet", "r160_in1k"), ("test_resnet.r160_in1k", "v1")],
)
def test_timm_default_tag_and_explicit_tag(name: str, choice: str, timm_requests: list[str]) -> None:
    backbone = build_backbone(name, pretrained=True, pretrained_weights=choice)
    assert timm_requests == ["test_resnet.r160_in1k"]
    assert backbone.weights == "timm/test_resnet.r160_in1k" and backbone.source == "timm"


def test_timm_tag_resolution_without_building() -> None:
    assert resolve_timm_weights("resnet50") == f"resnet50.{timm.models.get_pretrained_cfg('resnet50').tag}"
    assert resolve_timm_weights("resnet50", "a2_in1k") == "resnet50.a2_in1k"
    assert resolve_timm_weights("resnet50", "resnet50.a2_in1k") == "resnet50.a2_in1k"


def test_unknown_timm_tag_lists_the_valid_tags() -> None:
    with pytest.raises(ValueError, match=r"Unknown pretrained tag 'in22k' for timm's 'test_resnet'.*'r160_in1k'"):
        build_backbone("test_resnet", pretrained=True, pretrained_weights="in22k")


def test_timm_tag_given_twice_must_agree() -> None:
    with pytest.raises(ValueError, match="already selects the pretrained tag 'a1_in1k'"):
        resolve_timm_weights("resnet50.a1_in1k", "a2_in1k")


# ----------------------------------------------------------------------------------- failed downloads


def test_offline_torchvision_download_names_the_file_and_where_to_put_it(
    hub_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    target = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(DownloadError) as info:
        build_network("resnet18", whitening=8, pretrained=True)
    message = str(info.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in message and "name resolution" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"place it by hand at {target}" in message and "$TORCH_HOME/hub/checkpoints" in message
    assert "--not-pretrained" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert not target.exists()


def test_unreadable_cached_torchvision_weights_say_delete(hub_dir: Path) -> None:
    cached = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<html>captive portal</html>")
    with pytest.raises(DownloadError, match=rf"at {cached} could not be read .*delete that file"):
        build_backbone("resnet18", pretrained=True)


def test_offline_timm_download_names_the_repository_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    def offline(*args: object, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("Cannot reach the Hub and the file is not in the local cache.")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline)
    with pytest.raises(DownloadError) as info:
        build_network("test_resnet", whitening=4, pretrained=True)
    message = str(info.value)
    assert "timm's 'test_resnet.r160_in1k'" in message and "Cannot reach the Hub" in message
    assert "'timm/test_resnet.r160_in1k'" in message
    assert str(Path(constants.HF_HUB_CACHE) / "models--timm--test_resnet.r160_in1k") in message
    assert "--not-pretrained" in message


def test_download_error_is_a_user_error_of_the_cli() -> None:
    from raml.cli.main import _user_errors
    from raml.models.checkpoints import DownloadError as CheckpointsDownloadError

    assert CheckpointsDownloadError is DownloadError and issubclass(DownloadError, _user_errors())
