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
- torchvision vision transformers (``vit_b_16``, ...) are treated like timm's: the patch tokens become the
  map and the position embeddings are interpolated to the input's patch grid (``TorchvisionViTTrunk``).

Every torchvision classification family gives a map at any input size (checked at 224 and 320 px):
AlexNet, VGG, ResNet/ResNeXt/Wide-ResNet, RegNet, DenseNet, SqueezeNet, GoogLeNet, Inception-v3, MobileNet
v2/v3, MNASNet, ShuffleNet v2, EfficientNet (v1, v2), ConvNeXt, Swin (v1, v2) and ViT, except MaxViT, whose
window grid is fixed at 224 px when it is built: it is refused.

Plain names prefer torchvision; prefix ``timm/`` (or ``torchvision/``) to choose the library.

ImageNet weights (``pretrained_weights``): ``"v1"`` (the default) is what the reference's
``pretrained=True`` loads. In torchvision 0.13+ the legacy ``pretrained=True`` of every classification
builder maps to its ``IMAGENET1K_V1`` weights (checked for all 80 builders of torchvision 0.29): e.g.
``resnet50`` gets ``IMAGENET1K_V1`` (76.1 % top-1), not ``DEFAULT`` = ``IMAGENET1K_V2`` (80.9 %), which
``weights="DEFAULT"`` gives. The two builders without ``IMAGENET1K_V1`` (``regnet_y_128gf``, ``vit_h_14``)
had no legacy weights (``pretrained=True`` raises there), so ``"v1"`` is refused for them. ``"default"``
selects torchvision's ``DEFAULT``; any member name of the model's weights enum (``"IMAGENET1K_V2"``) selects
that member. For timm, ``"v1"`` and ``"default"`` are timm's default pretrained tag and anything else is a
timm pretrained tag. Failed downloads raise ``DownloadError`` naming the file and where to put it by hand.
"""

from __future__ import annotations

import difflib
import logging
import os
import pickle
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from raml.errors import DownloadError  # defined below every package; re-exported here

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "DownloadError",
    "TimmTrunk",
    "TorchvisionViTTrunk",
    "build_backbone",
    "resolve_timm_weights",
    "resolve_torchvision_weights",
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
# ``pretrained_weights`` values that select the library's reference choice rather than a named weight set.
_V1, _DEFAULT = "v1", "default"
_NOT_PRETRAINED_HINT = "or train from random weights with --not-pretrained"


def _download_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the weights could not be fetched" (network down, host unknown, HTTP error).

    ``urllib`` (torchvision, timm URLs) and Hugging Face Hub errors derive from ``OSError``; the HTTP client
    under ``huggingface_hub`` raises its own types for failures in the middle of a transfer.
    """
    errors: list[type[BaseException]] = [OSError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for attr in ("HTTPError", "TransportError", "RequestException"):
            error_type = getattr(module, attr, None)
            if isinstance(error_type, type) and issubclass(error_type, BaseException):
                errors.append(error_type)
    return tuple(dict.fromkeys(errors))


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
    weights: str | None = None
    """The ImageNet weights loaded (``"ResNet50_Weights.IMAGENET1K_V1"``, ``"timm/resnet50.a1_in1k"``), or
    None for random weights."""


@lru_cache(maxsize=1)
def torchvision_model_names() -> tuple[str, ...]:
    """Names of torchvision's classification models."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=1)
def timm_model_names() -> tuple[str, ...]:
    """Names of timm's registered models (timm is imported here, on first use: a torchvision backbone never needs
    it, and its import costs ~0.8 s)."""
    import timm

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


class TorchvisionViTTrunk(nn.Module):
    """A torchvision ``VisionTransformer`` cut to its patch tokens, for any input size.

    The patch embedding, class token and encoder are torchvision's own (state-dict keys ``conv_proj.*``,
    ``class_token``, ``encoder.*``); the classification head is dropped. At the size the model was built for,
    the tokens equal torchvision's; at other sizes the position embeddings of the patch grid are resampled
    to the input's grid (bicubic, antialiased, in float32, as timm does with ``dynamic_img_size``). Inputs
    whose sides are not multiples of the patch size lose the remainder, as in the patch convolution.

    Args:
        model: A torchvision ``VisionTransformer`` (its weights are shared, not copied).
    """

    def __init__(self, model: torchvision.models.VisionTransformer) -> None:
        super().__init__()
        self.conv_proj = model.conv_proj
        self.class_token = model.class_token
        self.encoder = model.encoder
        self.patch_size = int(model.patch_size)
        self.grid_size = int(model.image_size) // int(model.patch_size)

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings ``(1, 1 + height * width, D)`` for a ``height x width`` patch grid."""
        pos = self.encoder.pos_embedding
        if (height, width) == (self.grid_size, self.grid_size):
            return pos
        prefix, grid = pos[:, :1], pos[:, 1:]
        grid = grid.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        grid = grid.to(pos.dtype).flatten(2).transpose(1, 2)
        return torch.cat([prefix, grid], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 3, H, W)`` -> ``(B, D, H // patch, W // patch)``."""
        patches = self.conv_proj(x)
        batch, dim, height, width = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(batch, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(height, width)
        encoder = self.encoder
        tokens = encoder.ln(encoder.layers(encoder.dropout(tokens)))
        return tokens[:, 1:].transpose(1, 2).reshape(batch, dim, height, width)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, grid_size={self.grid_size}"


def _as_triple(values: object, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if values is None:
        return default
    values = tuple(float(v) for v in values)  # type: ignore[union-attr]
    if len(values) != 3:
        return default
    return values  # type: ignore[return-value]


def _torchvision_trunk(name: str, model: nn.Module) -> nn.Module:
    if isinstance(model, torchvision.models.VisionTransformer):
        return TorchvisionViTTrunk(model)
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


def _choices(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def resolve_torchvision_weights(name: str, pretrained_weights: str = _V1) -> torchvision.models.WeightsEnum:
    """The torchvision weights that ``pretrained_weights`` selects for the model ``name``.

    Args:
        name: A torchvision classification model name (``resnet50``).
        pretrained_weights: ``"v1"`` (the weights of the legacy ``pretrained=True``: ``IMAGENET1K_V1``),
            ``"default"`` (torchvision's ``DEFAULT``), or a member of the model's weights enum, by name
            (``"IMAGENET1K_V2"``) or in full (``"ResNet50_Weights.IMAGENET1K_V2"``).

    Returns:
        The weights enum member (``str()`` of it is ``"ResNet50_Weights.IMAGENET1K_V1"``).

    Raises:
        ValueError: If the model has no such weights; the message lists the valid names.
    """
    enum = torchvision.models.get_model_weights(name)
    members = [member.name for member in enum]
    valid = f"valid values for {name!r} are {_choices([_V1, _DEFAULT, *members])}"
    if not isinstance(pretrained_weights, str) or not pretrained_weights:
        raise ValueError(f"pretrained_weights must be a non-empty string; {valid}.")
    choice = pretrained_weights.strip()
    if choice.lower() == _V1:
        if "IMAGENET1K_V1" not in members:
            raise ValueError(
                f"torchvision's {name!r} has no IMAGENET1K_V1 weights (the reference's pretrained=True has none "
                f"for it either); choose one with --pretrained-weights (pretrained_weights=...): "
                f"{_choices([_DEFAULT, *members])}, {_NOT_PRETRAINED_HINT}."
            )
        return enum["IMAGENET1K_V1"]
    if choice.lower() == _DEFAULT:
        return enum.DEFAULT
    member = choice.split(".", 1)[1] if choice.startswith(f"{enum.__name__}.") else choice
    for candidate in (member, member.upper()):
        if candidate in members:
            return enum[candidate]
    raise ValueError(f"Unknown pretrained weights {pretrained_weights!r} for torchvision's {name!r}; {valid}.")


def resolve_timm_weights(name: str, pretrained_weights: str = _V1) -> str:
    """The timm ``<model>.<tag>`` name whose weights ``pretrained_weights`` selects.

    Args:
        name: A timm model name, optionally with a pretrained tag (``resnet50`` or ``resnet50.a1_in1k``).
        pretrained_weights: ``"v1"`` or ``"default"``: the tag in ``name``, else timm's default tag for the
            model; anything else is a timm pretrained tag (``"a1_in1k"``).

    Returns:
        The model name with its tag, e.g. ``"resnet50.a1_in1k"``.

    Raises:
        ValueError: If the model has no pretrained weights, the tag is unknown, or it contradicts the tag in
            ``name``; the message lists the valid tags.
    """
    import timm

    arch, _, name_tag = name.partition(".")
    tags = [full.partition(".")[2] for full in timm.list_pretrained(f"{arch}.*") if full.partition(".")[0] == arch]
    if not tags:
        raise ValueError(
            f"timm's {arch!r} has no pretrained weights; build it with --not-pretrained (pretrained=False) or "
            "choose a model listed by timm.list_pretrained()."
        )
    valid = f"valid tags for timm's {arch!r} are {_choices(tags)} (or {_V1!r}/{_DEFAULT!r} for timm's default)"
    if not isinstance(pretrained_weights, str) or not pretrained_weights:
        raise ValueError(f"pretrained_weights must be a non-empty string; {valid}.")
    choice = pretrained_weights.strip()
    if choice.lower() in (_V1, _DEFAULT):
        tag = name_tag or timm.models.get_pretrained_cfg(arch).tag
    else:
        tag = choice[len(arch) + 1 :] if choice.startswith(f"{arch}.") else choice
        if name_tag and tag != name_tag:
            raise ValueError(
                f"The model name {name!r} already selects the pretrained tag {name_tag!r}, but pretrained_weights "
                f"asks for {choice!r}; give the tag in one place only."
            )
    if tag not in tags:
        raise ValueError(f"Unknown pretrained tag {tag!r} for timm's {arch!r}; {valid}.")
    return f"{arch}.{tag}"


def _hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches the file of ``url``."""
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _torchvision_download_error(
    name: str, weights: torchvision.models.WeightsEnum, error: BaseException
) -> DownloadError:
    path = _hub_checkpoint_path(weights.url)
    if path.is_file():  # the file is there but could not be read: a truncated or foreign file
        return DownloadError(
            f"The ImageNet weights {weights} of torchvision's {name!r} at {path} could not be read "
            f"({type(error).__name__}: {error}); delete that file to download it again, {_NOT_PRETRAINED_HINT}."
        )
    return DownloadError(
        f"Could not download the ImageNet weights {weights} of torchvision's {name!r} "
        f"({type(error).__name__}: {error}). If this machine is offline, download {weights.url} elsewhere and "
        f"place it by hand at {path} (torch's hub cache: $TORCH_HOME/hub/checkpoints/{path.name}), "
        f"{_NOT_PRETRAINED_HINT}."
    )


def _timm_download_error(full_name: str, error: BaseException) -> DownloadError:
    import timm

    cfg = timm.models.get_pretrained_cfg(full_name)
    places = []
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import constants

        repo = cfg.hf_hub_id.split("@", 1)[0]
        filename = cfg.hf_hub_filename or "model.safetensors"
        folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        places.append(
            f"timm fetches {filename} of the Hugging Face Hub repository {repo!r} into the Hugging Face cache "
            f"{folder}; on a machine with internet run `hf download {repo} {filename}` and copy its cache folder "
            f"models--{repo.replace('/', '--')} to {folder.parent} here (then set HF_HUB_OFFLINE=1)"
        )
    if cfg is not None and cfg.url:
        path = _hub_checkpoint_path(cfg.url)
        # timm reads the torch hub cache first only with TIMM_USE_OLD_CACHE=1 when the Hub is an option.
        switch = " and set TIMM_USE_OLD_CACHE=1" if places else ""
        places.append(f"{'or ' if places else ''}download {cfg.url} and place it at {path} (torch's hub cache){switch}")
    where = "; ".join(places) or "see timm's documentation on pretrained weights"
    return DownloadError(
        f"Could not download the pretrained weights of timm's {full_name!r} ({type(error).__name__}: {error}). "
        f"If this machine is offline: {where}; {_NOT_PRETRAINED_HINT}."
    )


def _build_torchvision(
    name: str, pretrained: bool, pretrained_weights: str
) -> tuple[nn.Module, tuple, tuple, str | None]:
    # Refuse before building (and downloading): MaxViT's window partition is fixed at construction.
    if torchvision.models.get_model_builder(name).__module__ == torchvision.models.maxvit.__name__:
        raise ValueError(
            f"torchvision's {name!r} partitions its feature maps into windows whose grid is fixed when it is built "
            "(224 px inputs only), so it cannot embed the teacher's and the student's resolutions; use another "
            "family (e.g. 'convnext_tiny', 'swin_t', 'vit_b_16', 'resnet50') or a timm model."
        )
    weights = resolve_torchvision_weights(name, pretrained_weights) if pretrained else None
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except _download_errors() as error:
        if weights is None:
            raise
        raise _torchvision_download_error(name, weights, error) from error
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
        # A hash mismatch of a fresh download, or an unreadable file in the hub cache.
        if weights is None or not ("hash" in str(error) or _hub_checkpoint_path(weights.url).is_file()):
            raise
        raise _torchvision_download_error(name, weights, error) from error
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if getattr(model, "transform_input", False):
        # GoogLeNet/Inception with ImageNet weights re-normalise their input inside forward() to
        # mean = std = 0.5; the cut trunk skips that step, so feed it that normalisation directly.
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return _torchvision_trunk(name, model), mean, std, (str(weights) if weights is not None else None)


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    import timm

    kwargs = {"pretrained": pretrained, "num_classes": 0, "global_pool": ""}
    try:
        # Position embeddings that follow the input size: the student and teacher see different sizes.
        return timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError as error:
        if "dynamic_img_size" not in str(error):
            raise
    return timm.create_model(name, **kwargs)


def _build_timm(name: str, pretrained: bool, pretrained_weights: str) -> tuple[nn.Module, tuple, tuple, str | None]:
    full_name = resolve_timm_weights(name, pretrained_weights) if pretrained else name
    try:
        model = _create_timm(full_name, pretrained)
    except _download_errors() as error:
        if not pretrained:
            raise
        raise _timm_download_error(full_name, error) from error
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = _as_triple(cfg.get("mean"), IMAGENET_MEAN)
    std = _as_triple(cfg.get("std"), IMAGENET_STD)
    trunk = TimmTrunk(model)
    _freeze_unused_parameters(full_name, trunk)
    return trunk, mean, std, (f"timm/{full_name}" if pretrained else None)


def _freeze_unused_parameters(name: str, trunk: nn.Module) -> None:
    """Freeze (``requires_grad=False``) the parameters that ``forward_features`` never uses.

    timm keeps parts of the classifier head with ``num_classes=0`` (ConvNeXt's and Hiera's ``head.norm``,
    MaxViT's ``head.pre_logits``, MobileNetV3's ``conv_head``, ``fc_norm`` of some ViTs). They never get a
    gradient, and DistributedDataParallel then waits for them and fails on the second batch ("Expected to have
    finished reduction in the prior iteration"). Found by one dry forward and backward (eval mode, zeros);
    frozen rather than removed, so that state-dict keys (and existing checkpoints) stay as they are.
    """
    was_training = trunk.training
    trunk.eval()
    try:
        for size in _PROBE_SIZES:
            try:
                trunk(torch.zeros(1, 3, size, size)).float().sum().backward()
                break
            except Exception:  # noqa: BLE001 - the next size; _probe_channels reports models that fail at all
                trunk.zero_grad(set_to_none=True)
        else:
            return
        unused = [param_name for param_name, param in trunk.named_parameters() if param.grad is None]
        for param in trunk.parameters():
            if param.grad is None:
                param.requires_grad_(False)
        trunk.zero_grad(set_to_none=True)
    finally:
        trunk.train(was_training)
    if unused:
        logger.debug("timm %r: frozen parameters that forward_features does not use: %s", name, ", ".join(unused))


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


def resolve_architecture(architecture: str) -> tuple[str, str]:
    """``(library, model name)`` of an architecture name as :func:`build_backbone` reads it (``timm/`` and
    ``torchvision/`` prefixes; a plain name prefers torchvision), without building anything.

    Raises:
        ValueError: If the name is empty or neither library knows it (with close matches).
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
    if source is None:
        source = "torchvision" if in_torchvision else "timm"
    # timm's registry is asked only for a timm name: a torchvision backbone never imports timm (~0.8 s); timm
    # accepts "<model>.<pretrained tag>", and the registry lists the model names without tags
    known = in_torchvision if source == "torchvision" else name.split(".", 1)[0] in timm_model_names()
    if not known:
        raise _unknown_model_error(name)
    return source, name


def build_backbone(architecture: str, pretrained: bool, pretrained_weights: str = _V1) -> Backbone:
    """Build a backbone by name.

    Args:
        architecture: A torchvision classification model name (``resnet50``), a timm model name
            (``vit_small_patch16_224``), or either prefixed with ``timm/`` / ``torchvision/`` to choose
            the library when both have the name (plain names prefer torchvision).
        pretrained: Load ImageNet weights (needs network access or a cached file).
        pretrained_weights: Which weights when ``pretrained``: ``"v1"`` (the reference's choice: torchvision's
            ``IMAGENET1K_V1``, timm's default tag), ``"default"`` (torchvision's ``DEFAULT``, timm's default
            tag), a torchvision weights name (``"IMAGENET1K_V2"``) or a timm pretrained tag. Ignored
            without ``pretrained``.

    Returns:
        The trunk with its channel count, input normalisation and the weights loaded.

    Raises:
        ValueError: If the name is unknown, the model has no usable feature map, or the weights are unknown.
        DownloadError: If the weights could not be downloaded (the message says where to put them by hand).
    """
    source, name = resolve_architecture(architecture)
    build = _build_torchvision if source == "torchvision" else _build_timm
    module, mean, std, weights = build(name, pretrained, pretrained_weights)
    channels = _probe_channels(architecture, module)
    logger.debug("Built %s backbone %r with %d channels (weights: %s).", source, name, channels, weights)
    return Backbone(module=module, channels=channels, mean=mean, std=std, source=source, weights=weights)
