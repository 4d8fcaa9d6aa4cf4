"""Embedding extraction: a network and a list of images -> an (N, D) float32 matrix, rows in list order.

Images go through the evaluation transform (Lanczos resize of the shorter side to S + S/7, centre crop S)
with the network's own mean/std, in batches, on the device the caller chose.

Multi-scale embedding (the reference's ``--multiscale``, used for queries only): the evaluation-transformed
batch ``(B, 3, S, S)`` is rescaled bilinearly by each scale ``s`` (``s == 1`` is the batch itself), each
rescaled batch is embedded, and with ``p`` the multi-scale power (:func:`multiscale_power`)::

    v = (mean_s  f(x_s) ** p) ** (1 / p),   embedding = v / ||v||_2            (B, D)

Scales are parsed from the reference's list syntax by :func:`parse_scales`, which evaluates nothing: it walks
the expression tree and allows numbers and ``+ - * / **`` only.

How the forward pass runs (:func:`inference_network`): ``precision`` ``fp32`` (default) or ``bf16``
(:class:`Bf16Forward`, opt-in); on the CPU in fp32, ``runtime`` ``torch`` (PyTorch's eager forward, the
library's default), ``onnxruntime`` (:class:`raml.models.onnx_forward.OrtForward`, an fp32 onnxruntime graph
checked against the network) or ``auto`` (onnxruntime where it installs and passes the check, else torch; the
default of ``raml extract`` / ``raml test`` / ``raml index``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from raml.data.datasets import ImageDataset
from raml.data.image_limits import DEFAULT_MAX_PIXELS
from raml.data.images import EvalTransform
from raml.distributed import DistContext, all_gather_rows, shard_bounds
from raml.models.forward_wrapper import NetworkWrapper
from raml.models.onnx_forward import AUTO_WARMUP_PIXELS, OrtForward, onnxruntime_available

# defined in a module without torch, for the command line's parsers; still importable from here
from raml.retrieval.scales import (  # noqa: F401
    CPU_RUNTIMES,
    SINGLE_SCALE,
    check_scaled_size,
    parse_scales,
    validate_scales,
)

logger = logging.getLogger(__name__)

#: Numeric precisions of the forward pass: ``fp32`` (the default, the paper's numbers) or ``bf16`` (opt-in:
#: bfloat16 autocast; fast only where the hardware has bf16 arithmetic, see :func:`bf16_support`).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def network_mean_std(network: nn.Module) -> tuple[list[float], list[float]]:
    """The input normalisation a network was trained with (its ``meta``), ImageNet defaults otherwise."""
    meta = getattr(network, "meta", {}) or {}
    mean = list(meta.get("mean", (0.485, 0.456, 0.406)))
    std = list(meta.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def multiscale_power(network: nn.Module, scales: Sequence[float]) -> float:
    """The exponent ``p`` of the multi-scale mean: GeM's learned ``p`` when the network pools with GeM and
    has no whitening and more than one scale is used; 1 (a plain mean) otherwise, as in the reference."""
    if len(scales) <= 1:
        return 1.0
    meta = getattr(network, "meta", {}) or {}
    pool = getattr(network, "pool", None)
    p = getattr(pool, "p", None)
    if meta.get("pooling") == "gem" and not meta.get("whitening") and isinstance(p, torch.Tensor) and p.numel() == 1:
        return float(p.detach().item())
    return 1.0


def embed_batch(
    network: nn.Module, images: torch.Tensor, scales: Sequence[float] = SINGLE_SCALE, power: float = 1.0
) -> torch.Tensor:
    """Embed ``(B, 3, S, S)`` images, at several scales when ``scales`` is not ``(1,)`` (see module docstring).

    Args:
        network: maps ``(B, 3, H, W)`` -> ``(B, D)``; on the images' device.
        images: the evaluation-transformed batch.
        scales: bilinear rescaling factors; ``(1,)`` is the plain single-scale embedding.
        power: the exponent ``p`` of the generalized mean over scales (:func:`multiscale_power`).

    Returns:
        ``(B, D)`` float32 embeddings, L2-normalised.
    """
    scales = validate_scales(scales)
    if scales == SINGLE_SCALE:
        return network(images).float()
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"the multi-scale power must be a positive finite number, got {power!r}")
    total: torch.Tensor | None = None
    for scale in scales:
        if scale == 1.0:
            rescaled = images
        else:
            height, width = images.shape[-2:]
            if math.floor(height * scale) < 1 or math.floor(width * scale) < 1:
                raise ValueError(
                    f"scale {scale} turns {height}x{width} images into less than one pixel; use larger scales "
                    "or a larger image size"
                )
            if math.floor(height * scale) * math.floor(width * scale) > DEFAULT_MAX_PIXELS:
                raise ValueError(
                    f"scale {scale:g} turns {height}x{width} images into {math.floor(height * scale)}x"
                    f"{math.floor(width * scale)} pixels each, over the limit of {DEFAULT_MAX_PIXELS} pixels; use "
                    "smaller scales or a smaller image size"
                )
            rescaled = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        term = network(rescaled).float().pow(power)
        total = term if total is None else total + term
    assert total is not None
    pooled = (total / len(scales)).pow(1.0 / power)
    return pooled / pooled.norm(p=2, dim=1, keepdim=True)


def bf16_support(device: torch.device | None = None, cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool, str]:
    """Whether ``device`` (default: the CPU) computes bfloat16 natively, and a sentence saying why or why not.

    On the CPU: the ``avx512_bf16`` or ``amx_bf16`` flag of ``/proc/cpuinfo`` (Intel Cooper Lake / Sapphire
    Rapids and later, AMD Zen 4 and later). Without them, bf16 autocast still runs but emulates the arithmetic
    and is usually slower than fp32. On CUDA: ``torch.cuda.is_bf16_supported()``.
    """
    if device is not None and device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA device {'supports' if ok else 'does not support'} bfloat16"
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False, f"cannot read {cpuinfo} to find the CPU's bf16 support; assuming none"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    found = [f for f in _BF16_CPU_FLAGS if f in flags]
    if found:
        return True, f"the CPU has {' and '.join(found)}: bf16 matrix arithmetic in hardware"
    return False, (
        "the CPU has neither avx512_bf16 nor amx_bf16: bf16 is emulated, usually slower than fp32 (it needs an "
        "Intel Cooper Lake / Sapphire Rapids or AMD Zen 4 or later CPU to pay off)"
    )


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse an unknown precision; warn once when bf16 is asked for on hardware that only emulates it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "bf16":
        native, reason = bf16_support(device)
        if not native:
            logger.warning("bf16 requested: %s. Running it anyway; expect no speed-up.", reason)


class Bf16Forward(NetworkWrapper):
    """``network``'s forward under bfloat16 autocast, its output L2-normalised again in float32.

    On the CPU the images go in channels-last (NHWC): oneDNN's bf16 convolutions run on that layout, and a
    contiguous (NCHW) batch is reordered at every layer. ResNet-50 + GeM + whitening, batch 16, 2 threads, AMD EPYC
    with AVX-512 BF16 (docs/benchmarks.md): 2.4x the fp32 forward at 224 px with NCHW input, 3.2x with NHWC; the
    network's weights are left as they are (reordering them too gained nothing more).

    Attributes the callers read from a network (``meta``, ``pool``, ``source_path``, ...) are forwarded to the
    wrapped network.

    Args:
        network: ``(B, 3, H, W)`` -> ``(B, D)``.
        device_type: The autocast device type (``"cpu"``, ``"cuda"``).
    """

    def __init__(self, network: nn.Module, device_type: str) -> None:
        super().__init__(network)
        self.device_type = device_type

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.device_type == "cpu" and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.network(images)
        return F.normalize(out.float(), dim=1)


def forward_precision(network: nn.Module) -> str:
    """The arithmetic of ``network``'s forward as :func:`inference_network` wrapped it: ``"bf16"`` or ``"fp32"``."""
    return "bf16" if isinstance(network, Bf16Forward) else "fp32"


def inference_network(
    network: nn.Module, device: torch.device, precision: str = "fp32", runtime: str = "torch"
) -> nn.Module:
    """``network`` wrapped for inference on ``device`` at ``precision`` with the CPU ``runtime`` (module doc).

    - ``precision="bf16"``: :class:`Bf16Forward` (``runtime`` does not apply).
    - fp32 on the CPU with ``runtime`` ``onnxruntime``: an :class:`OrtForward` exporting each size on its first
      batch; an export that fails or differs by more than 1e-4 raises. With ``auto``: one that exports a size
      only for a job of at least twice :data:`~raml.models.onnx_forward.AUTO_WARMUP_PIXELS` pixels
      (:meth:`~raml.models.onnx_forward.OrtForward.expect`, which :func:`extract_embeddings` calls; small jobs
      never pay the export) and falls back to PyTorch for a size whose export fails or differs.
    - ``torch``, another device, a network without parameters (e.g. an ONNX student already) or ``auto``
      without onnxruntime installed: the network itself.

    Build it once the weights are final: the onnxruntime graph reads them when it is first used at a size.

    Raises:
        ValueError: an unknown precision or runtime.
        ImportError: ``runtime="onnxruntime"`` without onnxruntime installed.
    """
    check_precision(precision, device)
    if runtime not in CPU_RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(CPU_RUNTIMES)}, got {runtime!r}.")
    if isinstance(network, Bf16Forward):
        return network
    if precision == "bf16":  # an OrtForward hands calls under autocast to its network
        return Bf16Forward(network, device.type)
    if isinstance(network, OrtForward):
        return network
    if runtime == "torch" or device.type != "cpu" or next(network.parameters(), None) is None:
        return network
    if runtime == "auto" and not onnxruntime_available():
        logger.info("onnxruntime is not installed: the forward runs in PyTorch (pip install onnxruntime is faster).")
        return network
    if runtime == "onnxruntime":
        return OrtForward(network, strict=True)
    return OrtForward(network, warmup_pixels=AUTO_WARMUP_PIXELS)


def worker_start_method(device: torch.device, workers: int) -> str | None:
    """How the loader's worker processes start: ``forkserver`` when the network runs on CUDA, else the default.

    A process that already uses CUDA (and, in multi-device ``raml index``, runs one extraction thread per
    device) must not ``fork`` its loader workers: a forked child inherits the CUDA context and the other
    threads' locks in whatever state they were. ``forkserver`` starts them from a clean server process.
    ``None`` (no workers, or a CPU device) keeps PyTorch's default, which is cheaper to start.
    """
    if workers > 0 and device.type == "cuda":
        return "forkserver"
    return None


def loader_workers(workers: int, items: int, batch_size: int) -> int:
    """The worker processes worth starting for a loader of ``items`` images in batches of ``batch_size``.

    A DataLoader starts all ``workers`` processes (each importing torch) however few batches it yields, so
    the count is capped at the number of batches, ``ceil(items / batch_size)``; ``0`` stays ``0`` (load in
    this process). Not for the training loader, whose workers serve many epochs.
    """
    if workers <= 0:
        return 0
    batches = math.ceil(items / batch_size) if items > 0 else 0
    if workers > batches:
        logger.debug("%d loader workers for %d batches of %d images: starting %d", workers, batches, items, batches)
        return batches
    return workers


@torch.inference_mode()
def extract_embeddings(
    network: nn.Module,
    paths: Sequence[str | Path],
    image_size: int,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    description: str = "extract",
    scales: Sequence[float] = SINGLE_SCALE,
    precision: str = "fp32",
    runtime: str = "torch",
) -> torch.Tensor:
    """Embed images with ``network`` at ``image_size``, optionally multi-scale (:func:`embed_batch`).

    Args:
        network: maps (B, 3, S, S) -> (B, D) L2-normalised embeddings; already on ``device``.
        paths: image files; the output rows follow this order.
        image_size: S, the side of the centre crop.
        device: where the network runs.
        batch_size: images per forward pass.
        workers: DataLoader worker processes (0 = load in this process).
        progress: show a progress bar.
        description: label of the progress bar.
        scales: rescaling factors of the evaluation-transformed images; ``(1,)`` is single-scale.
        precision: ``fp32`` (default) or ``bf16``: the forward under bfloat16 autocast, the embeddings
            L2-normalised again in float32 (opt-in; see :func:`bf16_support` and :class:`Bf16Forward`).
        runtime: how an fp32 forward runs on the CPU (:data:`CPU_RUNTIMES`, :func:`inference_network`);
            ``torch`` by default. A ``network`` already wrapped by :func:`inference_network` keeps its own.

    Returns:
        (N, D) float32 tensor on the CPU.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}.")
    scales = validate_scales(scales)
    check_scaled_size(scales, image_size, DEFAULT_MAX_PIXELS)  # before any work: not mid-run, in interpolate
    forward = inference_network(network, device, precision, runtime)
    power = multiscale_power(network, scales)
    if scales != SINGLE_SCALE:
        logger.info("Multi-scale embedding: scales %s, power %.4g (%s)", list(scales), power, description)
    if isinstance(forward, OrtForward):  # the job's size decides whether exporting to onnxruntime pays
        for scale in scales:
            side = image_size if scale == 1.0 else math.floor(image_size * scale)
            forward.expect((3, side, side), len(paths))
    mean, std = network_mean_std(network)
    dataset = ImageDataset(list(paths), None, EvalTransform(image_size, mean, std))
    workers = loader_workers(workers, len(dataset), batch_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        multiprocessing_context=worker_start_method(device, workers),
    )
    was_training = network.training
    network.eval()
    chunks: list[torch.Tensor] = []
    try:
        for images, _ in tqdm(loader, desc=description, unit="batch", disable=not progress, leave=False):
            embeddings = embed_batch(forward, images.to(device, non_blocking=True), scales, power)
            chunks.append(embeddings.cpu())
    finally:
        network.train(was_training)
    if not chunks:
        raise ValueError("No images to embed: the list of paths is empty.")
    return torch.cat(chunks)


def extract_embeddings_sharded(
    network: nn.Module,
    paths: Sequence[str | Path],
    image_size: int,
    device: torch.device,
    dist: DistContext,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    description: str = "extract",
    scales: Sequence[float] = SINGLE_SCALE,
    precision: str = "fp32",
    runtime: str = "torch",
) -> torch.Tensor:
    """:func:`extract_embeddings` split over ``torchrun`` processes: each embeds a contiguous share of
    ``paths`` and every process receives all (N, D) rows, in ``paths`` order (a collective call)."""
    if not dist.enabled:
        return extract_embeddings(
            network, paths, image_size, device, batch_size, workers, progress, description, scales, precision, runtime
        )
    start, stop = shard_bounds(len(paths), dist)
    if start < stop:
        local = extract_embeddings(
            network,
            list(paths)[start:stop],
            image_size,
            device,
            batch_size,
            workers,
            progress,
            description,
            scales=scales,
            precision=precision,
            runtime=runtime,
        )
    else:
        local = torch.zeros(0, int(getattr(network, "meta", {})["outputdim"]))
    # nccl gathers device tensors; gloo is happy either way
    return all_gather_rows(local.to(device), dist).cpu()
