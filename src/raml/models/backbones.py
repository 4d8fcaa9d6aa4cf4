"""Backbones from torchvision or timm, cut to their convolutional trunk.

Tensor contract: ``(B, 3, H, W)`` float, normalised with ``Backbone.mean``/``Backbone.std``
-> ``(B, C, h, w)`` feature map, for any input size the architecture accepts.

- torchvision classification models: ResNet-like models (a ``fc`` head) become an ``nn.Sequential`` of
  their children up to the global pool, so a ResNet's state-dict keys are ``0.*`` conv1, ``1.*`` bn1,
  ..., ``4.*``-``7.*`` layer1-layer4 (the layout of the published checkpoints); models with a
  ``.features`` trunk (VGG, EfficientNet, ConvNeXt, DenseNet, MobileNet, ...) use that trunk.
- timm models: ``create_model(num_classes=0, global_pool="")`` and ``forward_features``. Token outputs
  ``(B, N, C)`` of vision transformers are turned into a map by dropping prefix tokens and reshaping
  the patch tokens; channels-last outputs are permuted to channels-first.

Plain names prefer torchvision; prefix ``timm/`` (or ``torchvision/``) to choose the library.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from functools import lru_cache

import timm
import torch
import torchvision
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "TimmTrunk",
    "build_backbone",
    "torchvision_model_names",
    "timm_model_names",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Children of torchvision models that belong to the classification head (the trunk ends at the first)
# or to auxiliary training branches that must not run inline in a Sequential trunk.
_HEAD_CHILDREN = ("avgpool", "pool", "fc", "classifier", "head", "heads")
_AUX_CHILDREN = ("aux1", "aux2", "AuxLogits", "dropout")
# Input sizes tried, in order, for the dry forward that determines the channel count.
_PROBE_SIZES = (64, 224)


@dataclass(frozen=True)
class Backbone:
    """A feature extractor together with what is needed to feed it.

    Attributes:
        module: Maps ``(B, 3, H, W)`` -> ``(B, C, h, w)``.
        channels: Channel count C of the feature map.
        mean: Per-channel input mean (RGB, inputs in [0, 1]).
        std: Per-channel input standard deviation.
        source: ``"torchvision"`` or ``"timm"``.
    """

    module: nn.Module
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


@lru_cache(maxsize=1)
def torchvision_model_names() -> tuple[str, ...]:
    """Names of torchvision's classification models."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=1)
def timm_model_names() -> tuple[str, ...]:
    """Names of timm's registered models."""
    return tuple(timm.list_models())


class TimmTrunk(nn.Module):
    """Wrap a timm model so that it always returns a channels-first feature map.

    Args:
        model: A timm model created with ``num_classes=0``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def _grid_size(self, height: int, width: int) -> tuple[int, int]:
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
            h, w = patch_embed.dynamic_feat_size((height, width))
            return int(h), int(w)
        patch_size = getattr(patch_embed, "patch_size", None)
        if patch_size is None:
            raise ValueError(
                f"{type(self.model).__name__} returns tokens but has no patch_embed.patch_size, so its "
                "tokens cannot be arranged into a feature map; choose a convolutional or ViT-style model."
            )
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        return height // ph, width // pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` -> ``(B, C, h, w)``."""
        y = self.model.forward_features(x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"{type(self.model).__name__}.forward_features returned {type(y).__name__}, not a tensor; "
                "this model is not supported as a backbone."
            )
        if y.dim() == 3:
            tokens = y[:, self.num_prefix_tokens :]
            h, w = self._grid_size(x.shape[-2], x.shape[-1])
            if h * w != tokens.shape[1]:
                raise ValueError(
                    f"{type(self.model).__name__} returned {tokens.shape[1]} patch tokens for an input of "
                    f"{x.shape[-2]}x{x.shape[-1]} px, which does not form a {h}x{w} grid; use an input size "
                    "that is a multiple of the patch size."
                )
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        if y.dim() == 4:
            return y.permute(0, 3, 1, 2) if self.channels_last else y
        raise ValueError(
            f"{type(self.model).__name__}.forward_features returned shape {tuple(y.shape)}; expected a "
            "(B, C, h, w) feature map or (B, N, C) tokens."
        )


def _as_triple(values: object, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if values is None:
        return default
    values = tuple(float(v) for v in values)  # type: ignore[union-attr]
    if len(values) != 3:
        return default
    return values  # type: ignore[return-value]


def _torchvision_vit_error(name: str) -> ValueError:
    return ValueError(
        f"torchvision's {name!r} has fixed-size position embeddings and no feature map, so it cannot "
        "embed images of other sizes; use a timm vision transformer instead, e.g. "
        "'timm/vit_base_patch16_224' (see timm.list_models('vit_*'))."
    )


def _torchvision_trunk(name: str, model: nn.Module) -> nn.Module:
    if isinstance(model, torchvision.models.VisionTransformer):
        raise _torchvision_vit_error(name)
    if isinstance(model, torchvision.models.DenseNet):
        # DenseNet's forward applies a ReLU after its trunk, before pooling.
        features = model.features
        features.add_module("final_relu", nn.ReLU(inplace=False))
        return features
    children = dict(model.named_children())
    if "features" in children and "permute" not in children:
        return children["features"]
    trunk: list[nn.Module] = []
    for child_name, child in children.items():
        if child_name in _HEAD_CHILDREN:
            break
        if child_name in _AUX_CHILDREN:
            continue
        trunk.append(child)
    if not trunk:
        raise ValueError(f"Cannot find a convolutional trunk in torchvision's {name!r}.")
    return nn.Sequential(*trunk)


def _build_torchvision(name: str, pretrained: bool) -> tuple[nn.Module, tuple, tuple]:
    # Refuse before building: these models are large and slow to initialise.
    if torchvision.models.get_model_builder(name).__module__ == torchvision.models.vision_transformer.__name__:
        raise _torchvision_vit_error(name)
    weights = "DEFAULT" if pretrained else None
    model = torchvision.models.get_model(name, weights=weights)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if getattr(model, "transform_input", False):
        # GoogLeNet/Inception with ImageNet weights re-normalise their input inside forward() to
        # mean = std = 0.5; the cut trunk skips that step, so feed it that normalisation directly.
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return _torchvision_trunk(name, model), mean, std


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    kwargs = {"pretrained": pretrained, "num_classes": 0, "global_pool": ""}
    try:
        # Position embeddings that follow the input size: the student and teacher see different sizes.
        return timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError as error:
        if "dynamic_img_size" not in str(error):
            raise
    return timm.create_model(name, **kwargs)


def _build_timm(name: str, pretrained: bool) -> tuple[nn.Module, tuple, tuple]:
    model = _create_timm(name, pretrained)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = _as_triple(cfg.get("mean"), IMAGENET_MEAN)
    std = _as_triple(cfg.get("std"), IMAGENET_STD)
    return TimmTrunk(model), mean, std


def _probe_channels(name: str, module: nn.Module) -> int:
    """Run a tiny dry forward to find the channel count of the feature map."""
    was_training = module.training
    module.eval()
    errors = []
    try:
        for size in _PROBE_SIZES:
            try:
                with torch.no_grad():
                    param = next(module.parameters(), None)
                    device = param.device if param is not None else torch.device("cpu")
                    out = module(torch.zeros(1, 3, size, size, device=device))
            except Exception as error:  # noqa: BLE001 - try the next size, report all failures below
                errors.append(f"{size} px: {error}")
                continue
            if out.dim() != 4:
                raise ValueError(
                    f"Backbone {name!r} produced an output of shape {tuple(out.shape)} instead of a "
                    "(B, C, h, w) feature map; it cannot be used with global pooling."
                )
            if size != _PROBE_SIZES[0]:
                logger.warning(
                    "Backbone %r does not accept %d px inputs; it may need a fixed input size.",
                    name,
                    _PROBE_SIZES[0],
                )
            return int(out.shape[1])
    finally:
        module.train(was_training)
    raise ValueError(f"Backbone {name!r} failed a dry forward at every probe size: {'; '.join(errors)}")


def _unknown_model_error(name: str) -> ValueError:
    candidates = list(torchvision_model_names()) + list(timm_model_names())
    close = difflib.get_close_matches(name, candidates, n=6, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return ValueError(
        f"Unknown architecture {name!r}: it is neither a torchvision model "
        "(torchvision.models.list_models()) nor a timm model (timm.list_models())." + hint
    )


def build_backbone(architecture: str, pretrained: bool) -> Backbone:
    """Build a backbone by name.

    Args:
        architecture: A torchvision classification model name (``resnet50``), a timm model name
            (``vit_small_patch16_224``), or either prefixed with ``timm/`` / ``torchvision/`` to choose
            the library when both have the name (plain names prefer torchvision).
        pretrained: Load the library's default ImageNet weights (needs network access or a cache).

    Returns:
        The trunk with its channel count and input normalisation.

    Raises:
        ValueError: If the name is unknown or the model has no usable feature map.
    """
    if not isinstance(architecture, str) or not architecture:
        raise ValueError(f"architecture must be a non-empty model name, got {architecture!r}.")
    source: str | None = None
    name = architecture
    if name.startswith("timm/"):
        source, name = "timm", name[len("timm/") :]
    elif name.startswith("torchvision/"):
        source, name = "torchvision", name[len("torchvision/") :]

    in_torchvision = name in torchvision_model_names()
    # timm accepts "<model>.<pretrained tag>"; the registry lists the model names without tags.
    in_timm = name.split(".", 1)[0] in timm_model_names()
    if source is None:
        source = "torchvision" if in_torchvision else "timm" if in_timm else None
    if source is None or (source == "torchvision" and not in_torchvision) or (source == "timm" and not in_timm):
        raise _unknown_model_error(name)

    if source == "torchvision":
        module, mean, std = _build_torchvision(name, pretrained)
    else:
        module, mean, std = _build_timm(name, pretrained)
    channels = _probe_channels(architecture, module)
    logger.debug("Built %s backbone %r with %d channels.", source, name, channels)
    return Backbone(module=module, channels=channels, mean=mean, std=std, source=source)
