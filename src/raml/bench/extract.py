"""``raml bench extract``: embedding extraction with ``raml extract``'s code against the reference's loader.

Contract: ``num_images`` synthetic JPEGs at CUB-like sizes (sides 300..500 px, smooth colour fields with
texture, quality 90) in a temporary folder; one network (ResNet-50 + GeM + 512-d whitening, random weights,
seeded); for each size ``S`` (448 and 224 by default), in one run, with the same batch size, DataLoader
worker processes and torch threads:

* ``reference``: the reference's approach written plainly here: an ``ImagesFromList``-style dataset (PIL
  open, ``convert("RGB")``), the shorter side resized to ``S * 8 / 7`` with Lanczos (each side ``round()``-ed,
  as the reference's ``fg_eval_transform`` does), ``CenterCrop(S)``, ``ToTensor``, ``Normalize``, a
  ``DataLoader``, an eager fp32 forward under ``torch.no_grad``;
* ``raml``: :func:`raml.retrieval.extract.extract_embeddings` (fp32) as ``raml extract`` runs it by default
  (``--cpu-runtime auto``: the forward through onnxruntime, :class:`raml.models.onnx_forward.OrtForward`),
  the export of the network to ONNX and its check included in the time (``raml_export_s`` says how much);
* ``raml_torch``: the same with PyTorch's eager forward (``--cpu-runtime torch``): raml's loader alone;
* ``raml_bf16`` (with ``--bf16``): bfloat16 autocast (``precision="bf16"``), whether or not the CPU has
  native bf16 (the result says which).

Per size the result holds images/s of each, the ratios to the reference, the largest absolute difference of
the embeddings from the reference's, and where the reference's time goes (decode, resize, crop + tensor +
normalise, forward) measured image by image in this process on a few images.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from raml.bench import parsers
from raml.entry import setup_logging, write_json
from raml.models import build_network
from raml.retrieval.extract import bf16_support, extract_embeddings, inference_network, network_mean_std
from raml.utils import cpu_model

logger = logging.getLogger(__name__)

__all__ = ["format_extract_report", "main", "make_jpegs", "reference_embeddings", "run_extract_benchmark"]

_MIN_SIDE, _MAX_SIDE = 300, 500  # CUB-200-2011 images are mostly 300..500 px a side


def make_jpegs(folder: Path, num_images: int, seed: int = 0) -> list[Path]:
    """Write ``num_images`` JPEGs of random CUB-like sizes to ``folder``; returns their paths in order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_images):
        width, height = (int(v) for v in rng.integers(_MIN_SIDE, _MAX_SIDE + 1, 2))
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        texture = rng.integers(-24, 25, (height, width, 3), dtype=np.int16)
        pixels = np.clip(field + texture, 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


class _ImagesFromList(Dataset):
    """The reference's loader: open with PIL, convert to RGB, transform."""

    def __init__(self, paths: Sequence[Path], transform: transforms.Compose) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with open(self.paths[index], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img)


class _RescaleShorter:
    """The reference's evaluation resize: the shorter side to ``S + S/7``, each side ``round()``-ed, Lanczos."""

    def __init__(self, shorter: float) -> None:
        self.shorter = shorter

    def __call__(self, img: Image.Image) -> Image.Image:
        ratio = self.shorter / min(img.size)
        return img.resize((round(ratio * img.size[0]), round(ratio * img.size[1])), Image.Resampling.LANCZOS)


def _reference_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    return transforms.Compose(
        [
            _RescaleShorter(size + size / 7),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def reference_embeddings(
    network: torch.nn.Module, paths: Sequence[Path], size: int, batch_size: int, workers: int
) -> torch.Tensor:
    """The reference's extraction, plainly: DataLoader over the list, eager fp32 forward, rows in order."""
    mean, std = network_mean_std(network)
    loader = DataLoader(
        _ImagesFromList(paths, _reference_transform(size, mean, std)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
    )
    network.eval()
    out = []
    with torch.no_grad():
        for images in loader:
            out.append(network(images).cpu())
    return torch.cat(out)


def _stage_times(network: torch.nn.Module, paths: Sequence[Path], size: int) -> dict[str, float]:
    """Seconds per image of each step of the reference's pipeline, image by image in this process."""
    mean, std = network_mean_std(network)
    resize = _RescaleShorter(size + size / 7)
    rest = transforms.Compose(
        [transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(mean=list(mean), std=list(std))]
    )
    totals = dict.fromkeys(("decode", "resize", "crop_tensor_normalise", "forward"), 0.0)
    batch = []
    for path in paths:
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        t1 = time.perf_counter()
        img = resize(img)
        t2 = time.perf_counter()
        batch.append(rest(img))
        t3 = time.perf_counter()
        totals["decode"] += t1 - t0
        totals["resize"] += t2 - t1
        totals["crop_tensor_normalise"] += t3 - t2
    with torch.no_grad():
        images = torch.stack(batch)
        network(images[:1])  # warm-up
        t0 = time.perf_counter()
        network(images)
        totals["forward"] = time.perf_counter() - t0
    return {k: v / len(paths) for k, v in totals.items()}


def _raml_embeddings(
    network: torch.nn.Module,
    paths: Sequence[Path],
    size: int,
    batch_size: int,
    workers: int,
    precision: str = "fp32",
    runtime: str = "torch",
    export_seconds: list[float] | None = None,
) -> torch.Tensor:
    """``raml extract``'s path; the wrapper (and so any ONNX export) is built inside, so the caller's timing
    counts it; its export seconds are appended to ``export_seconds``."""
    forward = inference_network(network, torch.device("cpu"), precision, runtime)
    out = extract_embeddings(forward, [str(p) for p in paths], size, torch.device("cpu"), batch_size, workers, False)
    if export_seconds is not None:
        export_seconds.append(float(getattr(forward, "export_seconds", 0.0)))
    return out


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """``(embeddings, images per second, process CPU seconds)`` of one call."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn()
    seconds = time.perf_counter() - start
    return out, out.shape[0] / seconds, time.process_time() - cpu_start


def run_extract_benchmark(
    num_images: int = 64,
    sizes: Sequence[int] = (448, 224),
    batch_size: int = 16,
    workers: int = 1,
    threads: int | None = None,
    bf16: bool = False,
    stage_images: int = 4,
    seed: int = 0,
    runtime: str = "auto",
    architecture: str = "resnet50",
) -> dict:
    """Images/s of the reference's loader + eager forward against ``raml extract``'s, same images and network.

    Args:
        num_images: synthetic JPEGs embedded per size.
        sizes: image sizes ``S``.
        batch_size: images per forward pass (both sides).
        workers: DataLoader worker processes (both sides).
        threads: torch threads of this process (both sides); None keeps torch's default.
        bf16: also time raml with bfloat16 autocast and compare its embeddings.
        stage_images: images of the per-step breakdown of the reference's time.
        seed: images and weights seed.
        runtime: the CPU runtime of the ``raml`` row (``auto``: ``raml extract``'s default).
        architecture: the backbone (tests use a tiny one).

    Returns:
        A JSON-serialisable dict with one entry per size under ``sizes``: ``reference_ips``, ``raml_ips``,
        ``raml_torch_ips`` (images/s), their process CPU seconds, ``raml_export_s`` (the ONNX export and check,
        inside ``raml_ips``), ``speedup`` (raml / reference, wall), ``speedup_cpu`` (reference / raml CPU
        seconds), ``speedup_without_export``, ``torch_speedup`` (raml's loader with the eager forward /
        reference), ``max_abs_diff`` / ``torch_max_abs_diff`` (vs the reference's embeddings), ``stages``
        (seconds per image of each step), and with ``bf16`` the ``raml_bf16_*`` figures; plus the machine,
        load average (at the start and the end), thread and worker counts and whether the CPU has native bf16.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    load_before = list(os.getloadavg())
    torch.manual_seed(seed)
    network = build_network(architecture, pooling="gem", whitening=512, pretrained=False).eval()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="raml-bench-extract-") as tmp:
        paths = make_jpegs(Path(tmp), num_images, seed)
        for size in sizes:
            logger.info(
                "bench extract: %d images at %d px, batch %d, %d workers", num_images, size, batch_size, workers
            )
            # warm-up of both code paths (first-call allocations), not timed
            reference_embeddings(network, paths[:2], size, 2, 0)
            _raml_embeddings(network, paths[:2], size, 2, 0)
            ref, ref_ips, ref_cpu = _timed(partial(reference_embeddings, network, paths, size, batch_size, workers))
            eager, eager_ips, eager_cpu = _timed(
                partial(_raml_embeddings, network, paths, size, batch_size, workers, runtime="torch")
            )
            export: list[float] = []
            ours, ours_ips, ours_cpu = _timed(
                partial(_raml_embeddings, network, paths, size, batch_size, workers, "fp32", runtime, export)
            )
            ours_seconds = num_images / ours_ips
            entry = {
                "runtime": runtime,
                "reference_ips": ref_ips,
                "raml_ips": ours_ips,
                "raml_torch_ips": eager_ips,
                "reference_cpu_s": ref_cpu,
                "raml_cpu_s": ours_cpu,
                "raml_torch_cpu_s": eager_cpu,
                "raml_export_s": export[0],
                "speedup": ours_ips / ref_ips,
                "speedup_cpu": ref_cpu / ours_cpu,
                "speedup_without_export": num_images / (ours_seconds - export[0]) / ref_ips,
                "torch_speedup": eager_ips / ref_ips,
                "max_abs_diff": float((ours - ref).abs().max()),
                "torch_max_abs_diff": float((eager - ref).abs().max()),
            }
            if bf16:
                low, low_ips, low_cpu = _timed(
                    partial(_raml_embeddings, network, paths, size, batch_size, workers, "bf16")
                )
                entry.update(
                    {
                        "raml_bf16_ips": low_ips,
                        "raml_bf16_cpu_s": low_cpu,
                        "bf16_speedup": low_ips / eager_ips,
                        "bf16_max_abs_diff": float((low - eager).abs().max()),
                    }
                )
            entry["stages"] = _stage_times(network, paths[:stage_images], size)
            results[str(size)] = entry
    native, reason = bf16_support()
    return {
        "benchmark": "extract",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "num_images": num_images,
        "network": f"{architecture} + GeM + whitening 512, random weights",
        "batch_size": batch_size,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "bf16_native": native,
        "bf16_note": reason,
        "sizes": results,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_before,
        "load_average": list(os.getloadavg()),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }


def format_extract_report(result: dict) -> str:
    """A readable table of a :func:`run_extract_benchmark` result."""
    lines = [
        f"raml bench extract: {result['num_images']} JPEGs (CUB-like sizes), {result['network']}, batch "
        f"{result['batch_size']}, {result['workers']} workers, {result['torch_threads']} torch threads",
        f"machine: {result['cpu_model']}, {result['cpu_count']} cores, load average "
        f"{', '.join(f'{v:.2f}' for v in result['load_average_start'])} (start), "
        f"{', '.join(f'{v:.2f}' for v in result['load_average'])} (end); bf16: {result['bf16_note']}",
        "",
    ]
    for size, e in result["sizes"].items():
        line = (
            f"{size} px: reference {e['reference_ips']:.2f} img/s; raml ({e['runtime']}) {e['raml_ips']:.2f} img/s "
            f"({e['speedup']:.2f}x wall, {e['speedup_cpu']:.2f}x CPU, export {e['raml_export_s']:.1f} s included; "
            f"{e['speedup_without_export']:.2f}x without it), max |raml - reference| {e['max_abs_diff']:.2e}; "
            f"raml torch {e['raml_torch_ips']:.2f} img/s ({e['torch_speedup']:.2f}x), max |diff| "
            f"{e['torch_max_abs_diff']:.2e}"
        )
        if "raml_bf16_ips" in e:
            line += (
                f"; raml bf16 {e['raml_bf16_ips']:.2f} img/s ({e['bf16_speedup']:.2f}x raml torch fp32), "
                f"max |bf16 - fp32| {e['bf16_max_abs_diff']:.2e}"
            )
        lines.append(line)
        total = sum(e["stages"].values())
        parts = ", ".join(f"{k} {1000 * v:.1f} ms ({100 * v / total:.0f}%)" for k, v in e["stages"].items())
        lines.append(f"    reference's time per image: {parts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``raml bench extract [--num-images N] [--sizes S ...] [--batch-size B] [--workers W]
    [--threads T] [--bf16] [--cpu-runtime R] [--json PATH]``."""
    parser = parsers.extract_parser()
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    setup_logging(args.verbose)
    result = run_extract_benchmark(
        args.num_images,
        args.sizes,
        args.batch_size,
        args.workers,
        args.threads,
        args.bf16,
        seed=args.seed,
        runtime=args.cpu_runtime,
        architecture=args.architecture,
    )
    if args.json is not None:
        write_json(args.json, result)
    print(format_extract_report(result))
    return 0
