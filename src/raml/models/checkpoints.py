"""Checkpoints in the reference format, safe loading, and the zoo of published networks.

A checkpoint is a ``torch.save`` dict ``{"meta": {...}, "state_dict": {...}}`` (training checkpoints add
``epoch``, ``max_map``, ``optimizer``, ``scheduler``). ``meta`` holds plain Python values only
(``architecture``, ``pooling``, ``whitening``, ``mean``, ``std``, ``outputdim``, ``pretrained``,
``pretrained_weights``), so every file we write loads with ``torch.load(weights_only=True)``. A loaded
network maps ``(B, 3, H, W)`` -> ``(B, D)`` L2-normalised (see ``raml.models.network``).

Checkpoints written by the reference's training (``model_best.pth.tar``) have no ``meta``: the network is
then inferred from the weights (torchvision ResNets: depth, width and groups from the ``backbone.<i>.*``
keys; pooling from ``pool.p``; whitening from ``whiten.weight``; ImageNet mean/std). Their optimizer and
scheduler state may need more than ``weights_only=True`` allows (a numpy ``max_map``, a pickled scheduler
method): such files are read with ``raml.models.restricted_pickle``, which rebuilds only data and drops the
training machinery, and files that reference anything else are refused. Unrestricted unpickling is never used.

Published networks are fetched on first use into ``<data_root>/networks/<name>.pth``; the SHA-256 of each is
recorded in ``<data_root>/networks/SHA256SUMS`` (``sha256sum`` format) and checked on every later load.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import pickle
import re
import reprlib
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from raml.locking import same_file
from raml.models.backbones import IMAGENET_MEAN, IMAGENET_STD, DownloadError, TimmTrunk
from raml.models.network import EmbeddingNetwork, build_network
from raml.models.pooling import POOLINGS
from raml.models.restricted_pickle import (
    DeclaredSizeError,
    TorchScriptArchiveError,
    UnsafeGlobalError,
    check_declared_sizes,
    contains_dropped,
    is_torchscript_archive,
    restricted_torch_load,
    torch_load_mapped,
)
from raml.models.skip_init import weight_init_skipped
from raml.utils import atomic_path, atomic_torch_save, atomic_write_text, file_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "InvalidCheckpointError",
    "DownloadError",
    "PUBLISHED_NETWORKS",
    "PUBLISHED_URL_TEMPLATE",
    "save_checkpoint",
    "load_checkpoint_file",
    "run_record",
    "network_from_checkpoint",
    "download_file",
    "resolve_network_path",
    "load_network",
    "checkpoint_sha256",
    "infer_meta",
    "SHA256SUMS_NAME",
    "read_sha256sums",
    "record_sha256",
    "verify_sha256",
]

PUBLISHED_URL_TEMPLATE = "http://ptak.felk.cvut.cz/personal/sumapave/public/{name}.pth"

PUBLISHED_NETWORKS: dict[str, str] = {
    name: PUBLISHED_URL_TEMPLATE.format(name=name)
    for pattern in (
        "{}-448r-resnet50-512-gem-w",
        "{}-224r-resnet50-512-gem-w",
        "{}-S224r-T448r-resnet50-512-gem-w",
    )
    for name in (pattern.format(dataset) for dataset in ("cub", "cars", "sop"))
}
"""Published network name -> download URL (teachers at 448 and 224 px, distilled students)."""

ZOO_URL_ENV = "RAML_ZOO_URL"
"""Environment variable: a mirror's base URL for the published networks (``<base>/<name>.pth``), read at each
download; unset, the authors' host above is used."""


def published_url(name: str) -> str:
    """The download URL of a published network: ``$RAML_ZOO_URL/<name>.pth`` when that is set, else the authors'."""
    base = os.environ.get(ZOO_URL_ENV)
    return f"{base.rstrip('/')}/{name}.pth" if base else PUBLISHED_NETWORKS[name]


_RESERVED_KEYS = ("meta", "state_dict", "epoch", "max_map", "optimizer", "scheduler")


class CheckpointError(ValueError):
    """A file is not a usable network checkpoint (unreadable, unsafe, or inconsistent)."""


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as plain Python types (tuples become lists); refuse anything else."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    for kind in (str, int, float):  # a subclass (numpy.str_, numpy.float64, an enum) as the plain value
        if isinstance(value, kind):
            # the base type's own conversion: str() of a (str, Enum) member is 'Pooling.GEM', not its value 'gem'
            return {str: str.__str__, int: int.__int__, float: float.__float__}[kind](value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        item = value.item()  # a Python number, str or bytes; a datetime64 gives a datetime, refused below
        if item is None or type(item) in (bool, int, float, str):
            return item
    raise TypeError(
        f"Checkpoint {where} holds a {type(value).__name__}; only plain Python values (None, bool, int, "
        "float, str, lists and dicts of them) are allowed so that the file loads with weights_only=True."
    )


def save_checkpoint(
    path: str | Path,
    network: EmbeddingNetwork,
    *,
    epoch: int | None = None,
    max_map: float | None = None,
    optimizer: dict | None = None,
    scheduler: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Save a network (and optionally training state) atomically, in the reference format.

    Args:
        path: Destination file; written to a temporary file first, then renamed.
        network: The network; its ``meta`` and CPU copy of its state dict are stored.
        epoch: Training epoch, for training checkpoints.
        max_map: Best validation mAP so far.
        optimizer: ``optimizer.state_dict()``.
        scheduler: ``scheduler.state_dict()``.
        extra: More top-level entries (plain Python values or tensors); must not reuse reserved keys.

    Raises:
        ValueError: If ``extra`` reuses a reserved key.
        TypeError: If ``meta`` holds values that are not plain Python types.
    """
    checkpoint: dict[str, Any] = {
        "meta": _plain(network.meta, "meta"),
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
    }
    if epoch is not None:
        checkpoint["epoch"] = int(epoch)
    if max_map is not None:
        checkpoint["max_map"] = float(max_map)
    if optimizer is not None:
        checkpoint["optimizer"] = optimizer
        # The reference's resume reads checkpoint["scheduler"] unconditionally (None when there is none).
        checkpoint["scheduler"] = scheduler
    elif scheduler is not None:
        checkpoint["scheduler"] = scheduler
    if extra:
        clash = sorted(set(extra) & set(_RESERVED_KEYS))
        if clash:
            raise ValueError(f"extra reuses reserved checkpoint keys {clash}; pass them as keyword arguments.")
        checkpoint.update(extra)
    atomic_torch_save(checkpoint, path)
    logger.info("Saved checkpoint %s", path)


def _unpickling_detail(error: BaseException) -> str:
    message = str(error)
    return next(
        (line.strip() for line in message.splitlines() if "unsupported" in line.lower()),
        message.splitlines()[0] if message else type(error).__name__,
    )


def _unsafe_error(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"Refused to load {str(path)!r} for safety: its pickle references Python objects other than tensors, "
        "plain values and training state, and loading it could run arbitrary code. If you trust its origin, "
        "re-save only its 'meta' (plain values) and 'state_dict' (tensors) with torch.save. "
        f"Details: {detail}"
    )


class InvalidCheckpointError(CheckpointError):
    """A file that cannot be read as a checkpoint at all (corrupt, truncated, foreign); ``detail`` says why."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def _invalid_checkpoint(path: Path, detail: str) -> CheckpointError:
    """The error for a file that cannot be read as a checkpoint at all (corrupt, truncated, foreign)."""
    return InvalidCheckpointError(
        f"{str(path)!r} is not a valid checkpoint ({detail}); if it was downloaded, delete it to fetch it again.",
        detail,
    )


def _torchscript_error(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"Refused to load {str(path)!r}: it is a TorchScript archive (torch.jit.save; {detail}), not a checkpoint, "
        "and loading it would run the code it holds. raml reads checkpoints written by torch.save: save the "
        "network's 'meta' (plain values) and 'state_dict' (tensors) with torch.save, or use "
        "raml.models.save_checkpoint."
    )


def _load_restricted(path: Path, handle: IO[bytes], first_error: BaseException) -> dict:
    """Read a file that ``weights_only=True`` refused (from the start of ``handle``, open on it); keep only the
    entries rebuilt entirely from data."""
    try:
        handle.seek(0)
        loaded, dropped_globals = restricted_torch_load(handle)
    except TorchScriptArchiveError as error:
        raise _torchscript_error(path, error.detail) from error
    except UnsafeGlobalError as error:
        raise _unsafe_error(path, f"{error}; {_unpickling_detail(first_error)}") from error
    except Exception as error:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise _invalid_checkpoint(path, f"{type(error).__name__}: {error}") from error
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"{str(path)!r} holds a {type(loaded).__name__}, not a checkpoint dict with 'state_dict'."
        )
    state_dict = loaded.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise _unsafe_error(path, "its 'state_dict' is not a dict of tensors")
    kept: dict[str, Any] = {}
    dropped_keys = []
    for key, value in loaded.items():
        if contains_dropped(value):
            dropped_keys.append(str(key))
            continue
        if key == "meta":
            try:
                value = _plain(value, "meta")
            except TypeError:
                dropped_keys.append(str(key))
                continue
        elif key in ("epoch", "max_map") and hasattr(value, "item"):  # numpy / torch scalars
            value = value.item()
        kept[key] = value
    logger.warning(
        "%s needs more than weights-only unpickling (%s); read it with the restricted unpickler: kept %s, "
        "dropped %s (objects not rebuilt: %s).",
        path,
        _unpickling_detail(first_error),
        sorted(map(str, kept)),
        dropped_keys or "nothing",
        ", ".join(dropped_globals) or "none",
    )
    return kept


def run_record(path: str | Path) -> dict[str, Any] | None:
    """The ``"raml"`` record of a ``raml train`` checkpoint (what :meth:`raml.engine.trainer.Trainer._save` writes:
    the run's settings, sizes, ``val_ratio``, ...), read quietly and memory-mapped (the tensors stay on disk), or
    None: a legacy pickle (the reference's: no record), a TorchScript archive (never loaded), a file that asks
    for more memory than it holds, or one that cannot be read (the network's own load reports on it)."""
    try:
        with open(path, "rb") as handle:
            zipped = handle.read(4) == b"PK\x03\x04"
            handle.seek(0)
            if not zipped or is_torchscript_archive(handle) is not None:
                return None
            check_declared_sizes(handle)  # a file asking for more memory than it holds is never loaded
            checkpoint = torch_load_mapped(handle)  # the very file checked
    except (OSError, zipfile.BadZipFile):
        return None
    except Exception as error:  # noqa: BLE001 - torch raises many types for a corrupt file; the network's load says
        logger.debug("No run record read from %s (%s).", path, error)
        return None
    record = checkpoint.get("raml") if isinstance(checkpoint, dict) else None
    return record if isinstance(record, dict) else None


def load_checkpoint_file(path: str | Path) -> dict:
    """Load a checkpoint file safely onto the CPU.

    ``torch.load(weights_only=True)`` first. Files that it refuses because they reference other globals
    (checkpoints of the reference's training: a numpy ``max_map``, a pickled scheduler method) are read again
    with ``raml.models.restricted_pickle``: entries holding objects it does not rebuild (e.g. the scheduler)
    are dropped, with a warning; files referencing anything beyond data and training state are refused.

    Args:
        path: A ``.pth`` file written by ``save_checkpoint`` or the reference implementation.

    Returns:
        The checkpoint dict, with at least ``state_dict`` (``meta`` is absent in the reference's training
        checkpoints; see ``infer_meta``).

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If the file is not a checkpoint, needs arbitrary code to unpickle, is a TorchScript
            archive (refused before any load: ``torch.load`` would run it), or lacks a ``state_dict``;
            ``InvalidCheckpointError`` if it asks for more memory than it holds (a pickle calling
            ``bytearray(N)``, a compressed zip record, a storage larger than the file: refused before any
            allocation, see ``raml.models.restricted_pickle.check_declared_sizes``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    # One open file for every read: a file replaced under the same name between two reads is not seen.
    with open(path, "rb") as handle:
        try:
            torchscript = is_torchscript_archive(handle)  # the zip's directory only
        except zipfile.BadZipFile as error:  # e.g. truncated
            raise _invalid_checkpoint(path, str(error)) from error
        if torchscript is not None:
            raise _torchscript_error(path, torchscript)
        try:
            # before any unpickler allocates: a few bytes can ask for gigabytes (bytearray(N), a compressed record)
            check_declared_sizes(handle)
        except DeclaredSizeError as error:
            raise _invalid_checkpoint(path, str(error)) from error
        except Exception as error:  # noqa: BLE001 - a pickle that cannot be read at all: torch.load would fail too
            raise _invalid_checkpoint(path, f"its pickle cannot be read: {type(error).__name__}: {error}") from error
        try:
            checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "global" not in str(error).lower():
                raise _invalid_checkpoint(path, f"safe unpickling failed: {_unpickling_detail(error)}") from error
            checkpoint = _load_restricted(path, handle, error)
        except Exception as error:  # noqa: BLE001 - torch raises many types for a corrupt file
            raise _invalid_checkpoint(path, f"{type(error).__name__}: {error}") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict with 'meta' and 'state_dict'."
        )
    if "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{str(path)!r} lacks 'state_dict'; found keys {sorted(map(str, checkpoint))}. A network checkpoint "
            "needs 'state_dict' (the weights) and, unless written by the reference's training, 'meta'."
        )
    return checkpoint


# (block, blocks per layer, groups, width per group) of torchvision's ResNet family -> model name. In a
# bottleneck, layer1's first conv2 has weight (width, width / groups, 3, 3) with width = groups * width per
# group; basic blocks always have groups 1 and width 64.
_TORCHVISION_RESNETS: dict[tuple[str, tuple[int, ...], int, int], str] = {
    ("basic", (2, 2, 2, 2), 1, 64): "resnet18",
    ("basic", (3, 4, 6, 3), 1, 64): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 1, 64): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 1, 64): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 1, 64): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 32, 4): "resnext50_32x4d",
    ("bottleneck", (3, 4, 23, 3), 32, 8): "resnext101_32x8d",
    ("bottleneck", (3, 4, 23, 3), 64, 4): "resnext101_64x4d",
    ("bottleneck", (3, 4, 6, 3), 1, 128): "wide_resnet50_2",
    ("bottleneck", (3, 4, 23, 3), 1, 128): "wide_resnet101_2",
}
_RESNET_CHILDREN_WITH_WEIGHTS = {"0", "1", "4", "5", "6", "7"}  # conv1, bn1, layer1..layer4
_ARCHITECTURE_HINT = (
    "re-save it with a 'meta' dict ({'architecture': ..., 'pooling': ..., 'mean': ..., 'std': ...}) or pass "
    "architecture=... to raml.models.load_network"
)


def _infer_torchvision_resnet(state_dict: dict[str, Any]) -> str | None:
    """The torchvision ResNet whose trunk (``backbone.<i>.*`` keys) has exactly these layers, or None."""
    children: dict[str, set[int]] = {}
    for key in state_dict:
        parts = key.split(".")
        if parts[0] != "backbone" or len(parts) < 3:
            continue
        blocks = children.setdefault(parts[1], set())
        if parts[2].isdigit():
            blocks.add(int(parts[2]))
    if set(children) != _RESNET_CHILDREN_WITH_WEIGHTS:
        return None
    conv1 = state_dict.get("backbone.0.weight")
    conv2 = state_dict.get("backbone.4.0.conv2.weight")
    if conv1 is None or conv2 is None or tuple(conv1.shape[1:]) != (3, 7, 7) or conv2.dim() != 4:
        return None
    layers = tuple(len(children[i]) for i in ("4", "5", "6", "7"))
    if any(sorted(children[i]) != list(range(n)) for i, n in zip(("4", "5", "6", "7"), layers)):
        return None
    block = "bottleneck" if "backbone.4.0.conv3.weight" in state_dict else "basic"
    width, per_group = int(conv2.shape[0]), int(conv2.shape[1])
    if per_group <= 0 or width % per_group:
        return None
    groups = width // per_group
    return _TORCHVISION_RESNETS.get((block, layers, groups, width // groups))


def infer_meta(
    state_dict: dict[str, Any],
    source: str = "<checkpoint>",
    *,
    architecture: str | None = None,
    pooling: str | None = None,
    whitening: int | None = None,
) -> dict[str, Any]:
    """Describe the network of a checkpoint without ``meta`` (the reference's training checkpoints).

    - architecture: a torchvision ResNet (``resnet18/34/50/101/152``, ``resnext*``, ``wide_resnet*``) from
      its ``backbone.<i>.*`` keys: bottleneck or basic blocks, blocks per layer, groups and width;
    - pooling: ``gem`` if ``pool.p`` has one value, ``gemmp`` if it has one per channel; without ``pool.p``
      the network used ``mac`` or ``spoc``, which have no weights: the ``pooling`` hint must say which;
    - whitening: the rows of ``whiten.weight`` (0 without it);
    - mean/std: the ImageNet statistics the reference uses for torchvision backbones.

    Args:
        state_dict: The weights (``backbone.*``, ``pool.p``, ``whiten.*``), without a ``module.`` prefix.
        source: Where they came from, for messages.
        architecture: Use this architecture instead of inferring it (any name ``build_network`` accepts).
        pooling: Which pooling when the weights cannot tell (``mac`` or ``spoc``); checked against ``pool.p``.
        whitening: Expected whitening dimension; the weights win, a different value is logged.

    Returns:
        A ``meta`` dict for ``network_from_checkpoint``.

    Raises:
        CheckpointError: If the architecture or the pooling cannot be inferred; the message names the flag
            or argument that supplies it.
    """
    if architecture is None:
        architecture = _infer_torchvision_resnet(state_dict)
        if architecture is None:
            raise CheckpointError(
                f"{source} has no 'meta' and its weights are not those of a torchvision ResNet "
                f"({', '.join(_TORCHVISION_RESNETS.values())}), the only backbones that can be recognised from "
                f"their weights; {_ARCHITECTURE_HINT}."
            )
    p = state_dict.get("pool.p")
    if p is not None:
        inferred_pooling = "gem" if p.numel() == 1 else "gemmp"
        if pooling is not None and pooling.lower() != inferred_pooling:
            logger.warning(
                "%s: ignoring the pooling hint %r: its pool.p has %d value(s), which is %s pooling.",
                source,
                pooling,
                p.numel(),
                inferred_pooling,
            )
        pooling = inferred_pooling
    elif pooling is None:
        raise CheckpointError(
            f"{source} has no 'meta' and no pool.p, so it was trained with mac or spoc pooling, which have no "
            "weights and cannot be told apart; say which with --pool mac or --pool spoc (pooling=... in "
            "raml.models.load_network)."
        )
    elif pooling.lower() not in ("mac", "spoc"):
        raise CheckpointError(
            f"{source} has no pool.p, so its pooling cannot be {pooling!r} (gem and gemmp store pool.p); "
            "give --pool mac or --pool spoc."
        )
    weight = state_dict.get("whiten.weight")
    inferred_whitening = int(weight.shape[0]) if weight is not None else 0
    if whitening is not None and int(whitening) != inferred_whitening:
        logger.warning(
            "%s: ignoring the whitening hint %s: its weights have whitening %d.", source, whitening, inferred_whitening
        )
    meta = {
        "architecture": architecture,
        "pooling": pooling.lower(),
        "whitening": inferred_whitening,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    logger.info(
        "%s has no 'meta'; inferred from its weights: architecture %s, pooling %s, whitening %d, ImageNet mean/std.",
        source,
        meta["architecture"],
        meta["pooling"],
        meta["whitening"],
    )
    return meta


def _timm_reference_keys(network: EmbeddingNetwork, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The reference keeps a timm backbone unwrapped (``backbone.<timm key>``); ours is ``backbone.model.*``."""
    if not isinstance(network.backbone, TimmTrunk):
        return state_dict
    keys = [k for k in state_dict if k.startswith("backbone.")]
    if not keys or any(k.startswith("backbone.model.") for k in keys):
        return state_dict
    return {
        (f"backbone.model.{k[len('backbone.') :]}" if k.startswith("backbone.") else k): v
        for k, v in state_dict.items()
    }


_META_REPR = reprlib.Repr()  # a crafted value shown cut short, however long or deeply nested (repr would recurse)
_META_REPR.maxlevel, _META_REPR.maxlist, _META_REPR.maxtuple, _META_REPR.maxdict = 2, 4, 4, 4
_META_REPR.maxstring = _META_REPR.maxother = 40


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_meta_fields(meta: dict[str, Any], source: str | Path) -> None:
    """Refuse (:class:`CheckpointError`, naming the file and each field) a ``meta`` whose values are not of the
    types the network is rebuilt from: a crafted or damaged file would otherwise end in a bare ``ValueError``
    (``mean`` of strings), a ``TypeError`` or a ``RecursionError`` (an architecture nested 100 000 lists deep)."""
    problems = []
    for key in ("architecture", "pooling"):
        if not isinstance(meta[key], str) or not meta[key]:
            problems.append(f"{key} must be a name (a string), got {_META_REPR.repr(meta[key])}")
    for key in ("mean", "std"):
        value = meta.get(key)
        if value is None:
            continue
        numbers = isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value)
        if not numbers or (key == "std" and any(v <= 0 for v in value)):
            what = "three positive finite numbers" if key == "std" else "three finite numbers"
            problems.append(f"{key} must be {what} (one per RGB channel), got {_META_REPR.repr(value)}")
    for key in ("bn_sizes", "image_sizes"):
        value = meta.get(key)
        if value is None or (isinstance(value, (list, tuple)) and not value):  # [] read as absent, as elsewhere
            continue
        if not (isinstance(value, (list, tuple)) and value and all(_is_positive_int(v) for v in value)):
            problems.append(f"{key} must be a list of positive integers (image sides), got {_META_REPR.repr(value)}")
    if problems:
        raise CheckpointError(
            f"{source}: its meta is malformed: {'; '.join(problems)}. The file was damaged or not written by raml "
            "or the reference: re-save it with raml.models.save_checkpoint, or use the file it was copied from."
        )


def network_from_checkpoint(
    checkpoint: dict,
    source: str = "<checkpoint>",
    *,
    architecture: str | None = None,
    pooling: str | None = None,
    whitening: int | None = None,
) -> EmbeddingNetwork:
    """Rebuild a network from a loaded checkpoint dict.

    The whitening dimension is read from the shape of ``whiten.weight`` (the reference may store
    ``meta["whitening"]`` as a bool). Without ``meta`` (the reference's training checkpoints) the network is
    inferred from the weights by ``infer_meta``, helped by the hints. The backbone is built without
    pretrained weights and the state dict is loaded strictly.

    Args:
        checkpoint: A dict with ``state_dict`` and usually ``meta`` (see ``load_checkpoint_file``).
        source: Where it came from, for error messages.
        architecture: Hint for checkpoints without ``meta`` (see ``infer_meta``); ignored otherwise.
        pooling: Hint for checkpoints without ``meta`` (``mac`` or ``spoc``); ignored otherwise.
        whitening: Hint for checkpoints without ``meta``; ignored otherwise.

    Returns:
        The network in eval mode, on the CPU.

    Raises:
        CheckpointError: If ``meta`` lacks the architecture/pooling, names unknown ones, the network cannot
            be inferred, or the state dict does not match the network.
    """
    meta = checkpoint.get("meta")
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict) or (meta is not None and not isinstance(meta, dict)):
        raise CheckpointError(f"{source}: expected dicts under 'meta' and 'state_dict'.")
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    if state_dict and all(str(k).startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    if meta is None:
        meta = infer_meta(state_dict, source, architecture=architecture, pooling=pooling, whitening=whitening)
    missing = [key for key in ("architecture", "pooling") if key not in meta]
    if missing:
        raise CheckpointError(f"{source}: meta lacks {missing}; found meta keys {sorted(meta)}.")
    _check_meta_fields(meta, source)
    if str(meta["pooling"]).lower() not in POOLINGS:
        raise CheckpointError(
            f"{source}: meta names the pooling {meta['pooling']!r}, which is not supported; supported poolings "
            f"are {', '.join(POOLINGS)}."
        )
    whiten_weight = state_dict.get("whiten.weight")
    whitening = int(whiten_weight.shape[0]) if whiten_weight is not None else 0
    # no random weights drawn: the load below replaces every parameter and persistent buffer or fails
    # (raml.models.skip_init; a ResNet-18 builds in 18 ms instead of 111)
    with weight_init_skipped():
        try:
            network = build_network(
                str(meta["architecture"]), pooling=str(meta["pooling"]), whitening=whitening, pretrained=False
            )
        except ValueError as error:
            raise CheckpointError(f"{source}: cannot rebuild the network described by its meta: {error}") from error

        state_dict = _timm_reference_keys(network, state_dict)
        if meta.get("bn_sizes"):  # per-size BatchNorm statistics (raml.models.switchable_bn)
            from raml.models.switchable_bn import enable_size_bn

            enable_size_bn(network, meta["bn_sizes"])
    description = f"a {meta['architecture']!r} network with {meta['pooling']!r} pooling and whitening {whitening}"
    try:
        result = network.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"{source}: the state dict does not fit {description}: {error}") from error
    unexpected = list(result.unexpected_keys)
    missing_keys = list(result.missing_keys)
    if missing_keys or unexpected:
        raise CheckpointError(
            f"{source}: the state dict does not match {description}: missing keys {missing_keys[:10]}"
            f"{' ...' if len(missing_keys) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}."
        )

    rebuilt = dict(meta)
    rebuilt.update(
        architecture=network.meta["architecture"],
        pooling=network.meta["pooling"],
        whitening=whitening,
        outputdim=network.meta["outputdim"],
        mean=[float(v) for v in meta.get("mean", network.meta["mean"])],
        std=[float(v) for v in meta.get("std", network.meta["std"])],
        pretrained=bool(meta.get("pretrained", False)),
    )
    network.meta = rebuilt
    return network.eval()


def download_file(url: str, dest: str | Path, timeout: float = 60, retries: int = 3, retry_wait: float = 2.0) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; no partial file is ever left at ``dest``.

    Args:
        url: HTTP(S) address.
        dest: Destination file; the data goes to a temporary file in the same folder, renamed on success.
        timeout: Socket timeout in seconds.
        retries: Attempts in total for transient failures (HTTP 4xx errors are not retried).
        retry_wait: Seconds to wait before the second attempt (doubled each time).

    Returns:
        ``dest`` as a Path.

    Raises:
        DownloadError: If every attempt failed; the message names the URL and where to put the file.
    """
    dest = Path(dest)
    last_error: Exception | None = None
    for attempt in range(1, max(1, retries) + 1):
        try:
            with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None else None
                received = 0
                with (
                    open(tmp, "wb") as f,
                    tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar,
                ):
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                if total is not None and received != total:
                    raise OSError(f"connection closed after {received} of {total} bytes")
            logger.info("Downloaded %s to %s", url, dest)
            return dest
        except urllib.error.HTTPError as error:
            last_error = error
            if 400 <= error.code < 500:
                break
        except (OSError, ValueError) as error:  # URLError, timeouts, truncated transfers, bad URLs
            last_error = error
        if attempt < retries:
            wait = retry_wait * 2 ** (attempt - 1)
            logger.warning("Download of %s failed (%s); retrying in %.0f s.", url, last_error, wait)
            time.sleep(wait)
    raise DownloadError(
        f"Could not download {url} ({last_error}). Download it by hand (e.g. with a browser or wget) and "
        f"put it at {dest}."
    )


SHA256SUMS_NAME = "SHA256SUMS"
"""File next to the published networks recording their SHA-256, in ``sha256sum`` format."""

_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def _published_path(name: str, data_root: str | Path) -> Path:
    return Path(data_root) / "networks" / f"{name}.pth"


def read_sha256sums(folder: str | Path) -> dict[str, str]:
    """``file name -> hex SHA-256`` from ``<folder>/SHA256SUMS`` (empty if there is none); bad lines are skipped."""
    path = Path(folder) / SHA256SUMS_NAME
    if not path.is_file():
        return {}
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _SUM_LINE.match(line.strip())
        if match is None:
            if line.strip():
                logger.warning("%s line %d is not '<sha256>  <file>'; ignored.", path, number)
            continue
        sums[match.group(2)] = match.group(1).lower()
    return sums


#: the lock file next to SHA256SUMS that :func:`record_sha256` holds while it rewrites it, and how long it waits
_SUMS_LOCK_NAME = f".{SHA256SUMS_NAME}.lock"
_SUMS_LOCK_WAIT_S = 60.0


def _open_sums_lock(path: Path) -> tuple[int, bool]:
    """Open (creating it if absent) the lock file ``path``; returns its descriptor and whether this call created
    it."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        try:
            return os.open(path, flags), False
        except FileNotFoundError:  # removed by its holder in between: create it
            continue


@contextlib.contextmanager
def _sums_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<folder>/.SHA256SUMS.lock`` for the block, waiting up to a minute for
    another process (which holds it for one read and rewrite of SHA256SUMS). The file is removed on release; a
    waiter that then holds the removed file tries again on the new one (as :class:`raml.locking.DirectoryLock`).

    On a file system without file locks (NFS mounted without them, some FUSE file systems: ``flock`` fails with
    ENOLCK, EOPNOTSUPP, ...) the block runs without the lock, with a warning, and the lock file this call created
    is removed: recording a digest is the last step of a download, which should not fail for it (the SHA256SUMS
    of such a folder is then as it was before the lock existed: two processes recording at once can lose a line,
    which is recorded again when its network is next loaded)."""
    import errno
    import fcntl

    path = folder / _SUMS_LOCK_NAME
    deadline = time.monotonic() + _SUMS_LOCK_WAIT_S
    while True:
        fd, created = _open_sums_lock(path)
        unsupported: OSError | None = None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EAGAIN, errno.EACCES):  # EACCES: some systems' "would block"
                        unsupported = error
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"Another process has held {path} for over {_SUMS_LOCK_WAIT_S:.0f} s while recording "
                            f"a SHA-256 in {folder / SHA256SUMS_NAME}; wait for it to finish (or stop it) and run "
                            "again."
                        ) from None
                    time.sleep(0.01)
            same = same_file(fd, path)  # False: removed by the holder we waited for, so lock the next file
        except BaseException:
            os.close(fd)
            raise
        if unsupported is not None:
            if created and same:
                path.unlink(missing_ok=True)
            os.close(fd)
            logger.warning(
                "Cannot lock %s (%s): the file system of %s does not support file locks; recording the SHA-256 in "
                "%s without it (a process recording in the same folder at the same time could lose this line).",
                path,
                unsupported.strerror or unsupported,
                folder,
                SHA256SUMS_NAME,
            )
            yield
            return
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # while still held: a waiter on this file notices it is gone
        finally:
            os.close(fd)


def record_sha256(path: str | Path, digest: str | None = None) -> str:
    """Record the SHA-256 of ``path`` in ``SHA256SUMS`` of its folder (rewritten atomically); returns it.

    The read and rewrite hold a lock (``.SHA256SUMS.lock`` in the folder, removed after), so that processes
    recording digests in the same folder at once keep each other's lines."""
    path = Path(path)
    digest = digest or file_sha256(path)
    with _sums_lock(path.parent):
        sums = read_sha256sums(path.parent)
        sums[path.name] = digest
        atomic_write_text(path.parent / SHA256SUMS_NAME, "".join(f"{sums[n]}  {n}\n" for n in sorted(sums)))
    return digest


def verify_sha256(path: str | Path) -> None:
    """Check ``path`` against the SHA-256 recorded for it in ``SHA256SUMS`` of its folder, if any.

    Raises:
        CheckpointError: If the file's content differs from the recorded hash.
    """
    path = Path(path)
    recorded = read_sha256sums(path.parent).get(path.name)
    if recorded is None:
        return
    actual = file_sha256(path)
    if actual != recorded:
        raise CheckpointError(
            f"{path} is not the file that was downloaded: its SHA-256 is {actual}, but {recorded} was recorded in "
            f"{path.parent / SHA256SUMS_NAME} when it was first downloaded (a truncated or replaced file). Delete "
            f"{path} to download it again (or, if you replaced it on purpose, delete its line from "
            f"{SHA256SUMS_NAME})."
        )


def _checked_published(name: str, path: Path) -> Path:
    """Verify a cached published network against SHA256SUMS; record it there if it is not listed yet."""
    if path.name in read_sha256sums(path.parent):
        verify_sha256(path)
    else:  # cached before hashes were recorded, or placed by hand: trust it from now on
        digest = record_sha256(path)
        logger.info("Recorded the SHA-256 of %s (%s) in %s.", name, digest, path.parent / SHA256SUMS_NAME)
    return path


def resolve_network_path(name_or_path: str | Path, data_root: str | Path, download: bool = True) -> Path:
    """Find the checkpoint file for a path, a cached name, or a published name.

    A published network's file is checked against the SHA-256 recorded for it in
    ``<data_root>/networks/SHA256SUMS`` at its download (recorded on first use if the file was placed there by
    hand); any file given by path is checked too if the ``SHA256SUMS`` of its folder lists it.

    Args:
        name_or_path: An existing file; or a name with a file ``<data_root>/networks/<name>.pth``; or one
            of ``PUBLISHED_NETWORKS`` (downloaded there on first use).
        data_root: The data folder holding ``networks/``.
        download: Allow downloading a published network that is not cached yet.

    Returns:
        The path of the checkpoint file.

    Raises:
        ValueError: If nothing matches, or a published network is missing and ``download`` is False.
        CheckpointError: If a file differs from its recorded SHA-256.
        DownloadError: If the download fails.
    """
    candidate = Path(name_or_path)
    if candidate.is_file():
        verify_sha256(candidate)
        return candidate
    name = str(name_or_path)
    name = name[: -len(".pth")] if name.endswith(".pth") else name
    cached = _published_path(name, data_root)
    if cached.is_file():
        return _checked_published(name, cached) if name in PUBLISHED_NETWORKS else cached
    if name in PUBLISHED_NETWORKS:
        if not download:
            raise ValueError(
                f"Published network {name!r} is not in {cached.parent} and downloading is off; download "
                f"{published_url(name)} and put it at {cached}, or allow downloading."
            )
        logger.info("Downloading published network %s to %s", name, cached)
        path = download_file(published_url(name), cached)
        digest = record_sha256(path)
        logger.info("SHA-256 of %s: %s (recorded in %s)", name, digest, path.parent / SHA256SUMS_NAME)
        return path
    close = difflib.get_close_matches(name, list(PUBLISHED_NETWORKS), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown network {str(name_or_path)!r}: it is not an existing file, not a file "
        f"{cached}, and not a published network.{hint} Accepted forms: a path to a .pth checkpoint; a name "
        f"<name> with a file <data_root>/networks/<name>.pth; or a published name: "
        f"{', '.join(PUBLISHED_NETWORKS)}."
    )


def load_network(
    name_or_path: str | Path,
    data_root: str | Path = "data",
    device: torch.device | str = "cpu",
    download: bool = True,
    *,
    pooling: str | None = None,
    whitening: int | None = None,
    architecture: str | None = None,
) -> EmbeddingNetwork:
    """Load a network from a path, a cached name, or a published name.

    Args:
        name_or_path: See ``resolve_network_path``.
        data_root: The data folder holding ``networks/``.
        device: Where to put the network.
        download: Allow downloading a published network that is not cached yet.
        pooling: For checkpoints without ``meta`` only (the reference's training checkpoints): the pooling
            when the weights cannot tell (``mac`` or ``spoc``; CLI ``--pool``).
        whitening: For checkpoints without ``meta`` only: the expected whitening dimension (the weights win).
        architecture: For checkpoints without ``meta`` only: the architecture, when it is not a torchvision
            ResNet that can be recognised from the weights.

    Returns:
        The network in eval mode on ``device``, with ``network.source_path`` set.

    Raises:
        ValueError: If the name cannot be resolved (``CheckpointError`` if the file is unusable or the network
            cannot be inferred).
        DownloadError: If a download fails.
    """
    path = resolve_network_path(name_or_path, data_root, download=download)
    checkpoint = load_checkpoint_file(path)
    network = network_from_checkpoint(
        checkpoint, source=str(path), architecture=architecture, pooling=pooling, whitening=whitening
    )
    network = network.to(torch.device(device)).eval()
    network.source_path = path
    logger.info("Loaded network %s (%s, D=%d)", path, network.meta["architecture"], network.output_dim)
    return network


def checkpoint_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a checkpoint file, to identify the exact weights (e.g. in cache keys)."""
    return file_sha256(path)
