"""``raml bench pipeline``: coupled views per second, ours against the reference's approach, in one run.

Ours (the path training uses): a ``DataLoader`` over :class:`~raml.data.views.CoupledViewDataset` (each
image decoded once, ``P`` views rendered at DR and downsized to QR, uint8), then
:func:`~raml.data.views.mixup_views` on the CPU, which converts the views to float32 as it mixes them.

Baseline (the reference's approach): for every view, decode the image again and run a torchvision
``RandomResizedCrop + RandomHorizontalFlip + ColorJitter + ToTensor`` pipeline at QR and, with the same
random state, at DR; for every view's mixup decode a second random image and render it the same way, then
mix. It runs through the same ``DataLoader`` settings.

Tensor contract of one measured batch: student ``(B, P, 3, QR, QR)`` and teacher ``(B, P, 3, DR, DR)``
float32, mixed. The throughput unit is one coupled view (a student + teacher pair, mixed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from raml.data.images import load_image
from raml.data.views import COLOR_JITTER, CROP_RATIO, CROP_SCALE, CoupledViewDataset, mixup_views
from raml.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["BaselineCoupledViewDataset", "main", "make_synthetic_jpegs", "run_pipeline_benchmark"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


class _RandomIndices(Sampler[int]):
    """``count`` indices drawn uniformly with replacement (a fixed sequence for a given seed)."""

    def __init__(self, num_items: int, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.indices = torch.randint(num_items, (count,), generator=generator).tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class BaselineCoupledViewDataset(Dataset):
    """The reference's way of producing ``P`` mixed coupled views of an image (for comparison only).

    Each view decodes the image again and renders it at QR and at DR with two torchvision pipelines fed
    the same random state (so the crop, flip and jitter agree), then mixes it with a freshly decoded random
    other image rendered the same way. Returns float32 ``(P, 3, QR, QR)``, ``(P, 3, DR, DR)`` and the index.
    """

    def __init__(self, paths: Sequence[Path], student_size: int, teacher_size: int, pos_num: int, seed: int) -> None:
        from torchvision import transforms

        self.paths = list(paths)
        self.pos_num = pos_num
        self.seed = seed
        jitter = transforms.ColorJitter(**COLOR_JITTER)

        def pipeline(size: int) -> transforms.Compose:
            return transforms.Compose(
                [
                    transforms.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO),
                    transforms.RandomHorizontalFlip(),
                    jitter,
                    transforms.ToTensor(),
                ]
            )

        self.student_transform = pipeline(student_size)
        self.teacher_transform = pipeline(teacher_size)

    def __len__(self) -> int:
        return len(self.paths)

    def _render_pair(self, path: Path, seed: int) -> tuple[Tensor, Tensor]:
        img = load_image(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student = self.student_transform(img)
            torch.manual_seed(seed)
            teacher = self.teacher_transform(img)
        return student, teacher

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        rng = np.random.default_rng([self.seed, index])
        students, teachers = [], []
        for _ in range(self.pos_num):
            student, teacher = self._render_pair(self.paths[index], int(rng.integers(2**31)))
            partner = self.paths[int(rng.integers(len(self.paths)))]
            partner_student, partner_teacher = self._render_pair(partner, int(rng.integers(2**31)))
            lam = float(rng.beta(0.2, 0.2))
            students.append(lam * student + (1.0 - lam) * partner_student)
            teachers.append(lam * teacher + (1.0 - lam) * partner_teacher)
        return torch.stack(students), torch.stack(teachers), index


def make_synthetic_jpegs(
    folder: str | Path, count: int, width: int = 500, height: int = 375, seed: int = 0
) -> list[Path]:
    """Write ``count`` smooth random-colour JPEGs (quality 90) of the given size; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, size=(height, width, 3))
        img = Image.fromarray(np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8))
        path = folder / f"synthetic_{i:04d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a folder; point it at a folder of image files.")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(
            f"No image files ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {folder}; omit --images to "
            "benchmark on generated 500x375 JPEGs."
        )
    return paths


def _time_loader(loader: DataLoader, generator: torch.Generator | None, num_batches: int) -> tuple[float, float, int]:
    """Wall seconds, this process's CPU seconds and coupled views for ``num_batches`` batches.

    Includes the float conversion and, for ours, the mixup (the baseline mixes inside its dataset).
    """
    views = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, (student, teacher, _) in enumerate(loader):
        if i >= num_batches:
            break
        if generator is not None:
            # uint8 in: the float conversion is fused into the mix (see mixup_views).
            student, teacher = mixup_views(student, teacher, generator)
        views += student.shape[0] * student.shape[1]
    return time.perf_counter() - start, time.process_time() - cpu_start, views


def run_pipeline_benchmark(
    image_paths: Sequence[str | Path],
    student_size: int = 224,
    teacher_size: int = 448,
    pos_num: int = 8,
    batch_size: int = 8,
    workers: int = 0,
    batches: int = 10,
    baseline_batches: int | None = None,
    seed: int = 0,
) -> dict:
    """Measure coupled views per second of our pipeline and of the reference's approach.

    Args:
        image_paths: Images to draw from (with replacement).
        student_size: QR in pixels.
        teacher_size: DR in pixels.
        pos_num: Views per image ``P``.
        batch_size: Images per batch ``B``.
        workers: DataLoader worker processes (0 = in the main process).
        batches: Batches to time for our pipeline.
        baseline_batches: Batches to time for the baseline (default: ``min(batches, 2)``, it is slow).
        seed: Seed of the sampled indices and the views.

    Returns:
        A JSON-serialisable report: ``coupled_views_per_s``, ``baseline_coupled_views_per_s``, ``speedup``
        (wall clock); with ``workers == 0`` also the same per CPU-second of this process
        (``coupled_views_per_cpu_s``, ``baseline_coupled_views_per_cpu_s``, ``speedup_cpu``); the settings,
        torch threads, CPU count and the timed seconds/views of both.

    Raises:
        ValueError: On no images or non-positive counts.
    """
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("image_paths is empty: the benchmark needs at least one image.")
    for name, value in (("batch_size", batch_size), ("batches", batches), ("pos_num", pos_num)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}.")
    baseline_batches = min(batches, 2) if baseline_batches is None else baseline_batches
    if baseline_batches < 1:
        raise ValueError(f"baseline_batches must be >= 1, got {baseline_batches}.")

    def make_loader(dataset: Dataset, num_batches: int) -> DataLoader:
        sampler = _RandomIndices(len(paths), num_batches * batch_size, seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)

    ours = CoupledViewDataset(paths, student_size, teacher_size, pos_num, seed)
    ours_seconds, ours_cpu, ours_views = _time_loader(
        make_loader(ours, batches), torch.Generator().manual_seed(seed), batches
    )
    baseline = BaselineCoupledViewDataset(paths, student_size, teacher_size, pos_num, seed)
    base_seconds, base_cpu, base_views = _time_loader(make_loader(baseline, baseline_batches), None, baseline_batches)

    ours_rate = ours_views / ours_seconds
    base_rate = base_views / base_seconds
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    if workers == 0:
        # CPU time of this process: a per-core figure that other load on a shared machine does not skew.
        cpu_rates = {
            "coupled_views_per_cpu_s": ours_views / ours_cpu,
            "baseline_coupled_views_per_cpu_s": base_views / base_cpu,
            "speedup_cpu": (ours_views / ours_cpu) / (base_views / base_cpu),
        }
    else:
        cpu_rates = {}  # the work runs in worker processes: this process's CPU time says nothing
    report = {
        "coupled_views_per_s": ours_rate,
        "baseline_coupled_views_per_s": base_rate,
        "speedup": ours_rate / base_rate,
        **cpu_rates,
        "settings": {
            "image_size": student_size,
            "teacher_image_size": teacher_size,
            "pos_num": pos_num,
            "batch_size": batch_size,
            "workers": workers,
            "batches": batches,
            "baseline_batches": baseline_batches,
            "num_images": len(paths),
            "seed": seed,
        },
        "torch_threads": torch.get_num_threads(),
        "cpus_available": cpus,
        "ours": {"seconds": ours_seconds, "cpu_seconds": ours_cpu, "coupled_views": ours_views},
        "baseline": {"seconds": base_seconds, "cpu_seconds": base_cpu, "coupled_views": base_views},
        "machine": platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    logger.info("coupled views/s: ours %.1f, baseline %.1f, speedup %.1fx", ours_rate, base_rate, report["speedup"])
    return report


def build_parser() -> argparse.ArgumentParser:
    """The ``raml bench pipeline`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="raml bench pipeline",
        description="Coupled views per second of the distillation data pipeline vs the reference's approach.",
    )
    parser.add_argument("--image-size", type=int, default=224, help="QR, the student's resolution (224)")
    parser.add_argument("--teacher-image-size", type=int, default=448, help="DR, the teacher's resolution (448)")
    parser.add_argument("--pos-num", type=int, default=8, help="coupled views per image (8)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (8)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = main process)")
    parser.add_argument("--images", type=Path, default=None, help="folder of images (default: generated JPEGs)")
    parser.add_argument("--num-synthetic", type=int, default=16, help="generated 500x375 JPEGs without --images")
    parser.add_argument("--batches", type=int, default=10, help="batches timed for our pipeline (10)")
    parser.add_argument("--baseline-batches", type=int, default=None, help="batches for the baseline (min(2, N))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from command-line flags; print the report as JSON. Returns the exit status."""
    args = build_parser().parse_args(argv)
    for flag, value in (
        ("--image-size", args.image_size),
        ("--teacher-image-size", args.teacher_image_size),
        ("--pos-num", args.pos_num),
        ("--batch-size", args.batch_size),
        ("--batches", args.batches),
        ("--num-synthetic", args.num_synthetic),
    ):
        if value < 1:
            raise SystemExit(f"raml bench pipeline: {flag} must be >= 1, got {value}.")
    if args.workers < 0:
        raise SystemExit(f"raml bench pipeline: --workers must be >= 0, got {args.workers}.")
    with tempfile.TemporaryDirectory(prefix="raml-bench-pipeline-") as tmp:
        if args.images is None:
            paths = make_synthetic_jpegs(tmp, args.num_synthetic, seed=args.seed)
        else:
            try:
                paths = _list_images(args.images)
            except FileNotFoundError as err:
                raise SystemExit(f"raml bench pipeline: {err}") from err
        report = run_pipeline_benchmark(
            paths,
            student_size=args.image_size,
            teacher_size=args.teacher_image_size,
            pos_num=args.pos_num,
            batch_size=args.batch_size,
            workers=args.workers,
            batches=args.batches,
            baseline_batches=args.baseline_batches,
            seed=args.seed,
        )
    report["settings"]["images"] = str(args.images) if args.images is not None else "synthetic 500x375 JPEG"
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        atomic_write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
