"""Checkpoints in the reference format, safe loading, and the zoo of published networks.

A checkpoint is a ``torch.save`` dict ``{"meta": {...}, "state_dict": {...}}`` (training checkpoints add
``epoch``, ``max_map``, ``optimizer``, ``scheduler``). ``meta`` holds plain Python values only
(``architecture``, ``pooling``, ``whitening``, ``mean``, ``std``, ``outputdim``, ``pretrained``), so every
file loads with ``torch.load(weights_only=True)``: files whose pickle would run arbitrary code are
refused. A loaded network maps ``(B, 3, H, W)`` -> ``(B, D)`` L2-normalised (see ``raml.models.network``).

Published networks are fetched on first use into ``<data_root>/networks/<name>.pth``.
"""

from __future__ import annotations

import difflib
import logging
import pickle
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from raml.models.network import EmbeddingNetwork, build_network
from raml.utils import atomic_path, atomic_torch_save, file_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "DownloadError",
    "PUBLISHED_NETWORKS",
    "PUBLISHED_URL_TEMPLATE",
    "save_checkpoint",
    "load_checkpoint_file",
    "network_from_checkpoint",
    "download_file",
    "resolve_network_path",
    "load_network",
    "checkpoint_sha256",
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

_RESERVED_KEYS = ("meta", "state_dict", "epoch", "max_map", "optimizer", "scheduler")


class CheckpointError(ValueError):
    """A file is not a usable network checkpoint (unreadable, unsafe, or inconsistent)."""


class DownloadError(OSError):
    """A published network could not be downloaded."""


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as plain Python types (tuples become lists); refuse anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
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


def load_checkpoint_file(path: str | Path) -> dict:
    """Load a checkpoint file safely (``weights_only=True``) onto the CPU.

    Args:
        path: A ``.pth`` file written by ``save_checkpoint`` or the reference implementation.

    Returns:
        The checkpoint dict, with at least ``meta`` and ``state_dict``.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If the file is not a checkpoint, needs arbitrary code to unpickle, or lacks
            ``meta``/``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        detail = next(
            (line.strip() for line in message.splitlines() if "unsupported" in line.lower()),
            message.splitlines()[0] if message else type(error).__name__,
        )
        if "global" in message.lower():
            raise CheckpointError(
                f"Refused to load {str(path)!r} for safety: its pickle references Python objects other than "
                "tensors and plain values, and loading it could run arbitrary code. If you trust its origin, "
                "re-save only its 'meta' (plain values) and 'state_dict' (tensors) with torch.save. "
                f"Details: {detail}"
            ) from error
        raise CheckpointError(
            f"{str(path)!r} is not a valid checkpoint (safe unpickling failed: {detail}); if it was "
            "downloaded, delete it to fetch it again."
        ) from error
    except Exception as error:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CheckpointError(
            f"{str(path)!r} is not a valid checkpoint ({type(error).__name__}: {error}); if it was "
            "downloaded, delete it to fetch it again."
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict with 'meta' and 'state_dict'."
        )
    missing = [key for key in ("meta", "state_dict") if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{str(path)!r} lacks {missing}; found keys {sorted(map(str, checkpoint))}. A network checkpoint "
            "needs 'meta' (architecture, pooling, ...) and 'state_dict'."
        )
    return checkpoint


def network_from_checkpoint(checkpoint: dict, source: str = "<checkpoint>") -> EmbeddingNetwork:
    """Rebuild a network from a loaded checkpoint dict.

    The whitening dimension is read from the shape of ``whiten.weight`` (the reference may store
    ``meta["whitening"]`` as a bool). The backbone is built without pretrained weights and the state
    dict is loaded strictly.

    Args:
        checkpoint: A dict with ``meta`` and ``state_dict`` (see ``load_checkpoint_file``).
        source: Where it came from, for error messages.

    Returns:
        The network in eval mode, on the CPU.

    Raises:
        CheckpointError: If ``meta`` lacks the architecture/pooling, names unknown ones, or the state dict
            does not match the network.
    """
    meta = checkpoint.get("meta")
    state_dict = checkpoint.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: expected dicts under 'meta' and 'state_dict'.")
    missing = [key for key in ("architecture", "pooling") if key not in meta]
    if missing:
        raise CheckpointError(f"{source}: meta lacks {missing}; found meta keys {sorted(meta)}.")
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    if state_dict and all(str(k).startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    whiten_weight = state_dict.get("whiten.weight")
    whitening = int(whiten_weight.shape[0]) if whiten_weight is not None else 0
    try:
        network = build_network(
            str(meta["architecture"]), pooling=str(meta["pooling"]), whitening=whitening, pretrained=False
        )
    except ValueError as error:
        raise CheckpointError(f"{source}: cannot rebuild the network described by its meta: {error}") from error

    result = network.load_state_dict(state_dict, strict=False)
    unexpected = list(result.unexpected_keys)
    missing_keys = list(result.missing_keys)
    if missing_keys or unexpected:
        raise CheckpointError(
            f"{source}: the state dict does not match a {meta['architecture']!r} network with "
            f"{meta['pooling']!r} pooling and whitening {whitening}: missing keys {missing_keys[:10]}"
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


def _published_path(name: str, data_root: str | Path) -> Path:
    return Path(data_root) / "networks" / f"{name}.pth"


def resolve_network_path(name_or_path: str | Path, data_root: str | Path, download: bool = True) -> Path:
    """Find the checkpoint file for a path, a cached name, or a published name.

    Args:
        name_or_path: An existing file; or a name with a file ``<data_root>/networks/<name>.pth``; or one
            of ``PUBLISHED_NETWORKS`` (downloaded there on first use).
        data_root: The data folder holding ``networks/``.
        download: Allow downloading a published network that is not cached yet.

    Returns:
        The path of the checkpoint file.

    Raises:
        ValueError: If nothing matches, or a published network is missing and ``download`` is False.
        DownloadError: If the download fails.
    """
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    name = str(name_or_path)
    name = name[: -len(".pth")] if name.endswith(".pth") else name
    cached = _published_path(name, data_root)
    if cached.is_file():
        return cached
    if name in PUBLISHED_NETWORKS:
        if not download:
            raise ValueError(
                f"Published network {name!r} is not in {cached.parent} and downloading is off; download "
                f"{PUBLISHED_NETWORKS[name]} and put it at {cached}, or allow downloading."
            )
        logger.info("Downloading published network %s to %s", name, cached)
        return download_file(PUBLISHED_NETWORKS[name], cached)
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
) -> EmbeddingNetwork:
    """Load a network from a path, a cached name, or a published name.

    Args:
        name_or_path: See ``resolve_network_path``.
        data_root: The data folder holding ``networks/``.
        device: Where to put the network.
        download: Allow downloading a published network that is not cached yet.

    Returns:
        The network in eval mode on ``device``, with ``network.source_path`` set.

    Raises:
        ValueError: If the name cannot be resolved (``CheckpointError`` if the file is unusable).
        DownloadError: If a download fails.
    """
    path = resolve_network_path(name_or_path, data_root, download=download)
    checkpoint = load_checkpoint_file(path)
    network = network_from_checkpoint(checkpoint, source=str(path))
    network = network.to(torch.device(device)).eval()
    network.source_path = path
    logger.info("Loaded network %s (%s, D=%d)", path, network.meta["architecture"], network.output_dim)
    return network


def checkpoint_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a checkpoint file, to identify the exact weights (e.g. in cache keys)."""
    return file_sha256(path)
