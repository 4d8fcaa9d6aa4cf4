"""``raml bench pipeline``: coupled views per second, ours against the reference's approach, in one run.

Four pipelines, each through a ``DataLoader`` with the same settings and the same sampled indices; the unit
is one coupled view (a student view at QR + a teacher view at DR, mixed), float32 out:

- **faithful** (ours, the default: the reference's mixup and the reference's pixels):
  :class:`~raml.data.views.CoupledViewDataset` with ``partners=True`` (image decoded once per item, each
  distinct partner once; every view and partner view rendered at QR and at DR from its crop box, flipped and
  jittered with torchvision's ``ColorJitter`` arithmetic at that size, uint8), then
  :func:`~raml.data.views.mix_partner_views` on the CPU. Our modes are loaded as the trainer loads them: each
  batch rendered in place (:func:`~raml.data.views.batch_loader_arguments`), the mixes' outputs from a
  :class:`~raml.data.buffers.BufferPool`.
- **fused** (``--fused-views``): the same with ``fused=True``: one colour matrix, the crop resized to DR
  and the DR view to QR (faster, not the reference's pixels).
- **batch** (ours, batch partners): ``CoupledViewDataset`` with ``partners=False``, then
  :func:`~raml.data.views.mixup_views` (partner = a view of another image of the batch).
- **reference** (the baseline, :class:`ReferenceMixupDataset`): the approach of the reference's
  ``AugFineGrainTS``, written here from its description: decode the image once per item; per view draw a
  seed, render the view with torchvision ``RandomResizedCrop + RandomHorizontalFlip + ColorJitter +
  ToTensor`` at QR and at DR (torch's RNG reseeded with the seed before each), draw a random image of the
  whole set, decode it, render it at QR and DR reseeded with the same seed, ``lam ~ Beta(0.2, 0.2)``, mix.

The faithful and batch modes jitter with numba kernels (:mod:`raml.data.jitter_kernel`): their first call
compiles them (or loads them from numba's on-disk cache); that is timed once before the runs and reported as
``jit_first_call``, not counted in the rates.

Neither side normalises (the reference's ``Normalize`` is left out of the baseline; our trainer normalises
on the device). Speed-ups are ``ours / reference`` per CPU-second of the benchmark process (the per-core
figure; only with ``workers == 0``) and per wall-second, each rate the best of ``repeat`` runs.

Tensor contract of one measured batch: student ``(B, P, 3, QR, QR)`` and teacher ``(B, P, 3, DR, DR)``
float32, mixed.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from raml.bench import parsers
from raml.data.buffers import BufferPool
from raml.data.images import load_image
from raml.data.jitter_kernel import warm_up
from raml.data.views import (
    COLOR_JITTER,
    CROP_RATIO,
    CROP_SCALE,
    RESIZE_BACKENDS,
    CoupledViewDataset,
    batch_loader_arguments,
    mix_partner_views,
    mixup_views,
)
from raml.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["GOALS", "ReferenceMixupDataset", "main", "make_synthetic_jpegs", "run_pipeline_benchmark"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
#: Speed-up goals per CPU core against the reference's approach, per mode of ours.
GOALS: dict[str, float] = {"faithful": 4.0, "fused": 4.0, "batch": 5.0}
_MIXUP_ALPHA = 0.2


class _RandomIndices(Sampler[int]):
    """``count`` indices drawn uniformly with replacement (a fixed sequence for a given seed)."""

    def __init__(self, num_items: int, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.indices = torch.randint(num_items, (count,), generator=generator).tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ReferenceMixupDataset(Dataset):
    """The reference's way of producing ``P`` mixed coupled views of an image (the baseline, for timing only).

    Per item the image is decoded once. Per view: a seed; the view at QR and at DR by two torchvision
    pipelines, torch's RNG reseeded with the seed before each (so crop, flip and jitter agree); a partner
    index uniform over the dataset (it may be the item), the partner decoded and rendered at both
    resolutions reseeded with the same seed; ``lam ~ Beta(0.2, 0.2)``; both resolutions mixed with it.
    Returns float32 ``(P, 3, QR, QR)`` and ``(P, 3, DR, DR)`` in [0, 1] and the index.
    """

    def __init__(self, paths: Sequence[Path], student_size: int, teacher_size: int, pos_num: int, seed: int) -> None:
        from torchvision import transforms

        self.paths = list(paths)
        self.pos_num = pos_num
        self.seed = seed

        def pipeline(size: int) -> transforms.Compose:
            return transforms.Compose(
                [
                    transforms.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO),
                    transforms.RandomHorizontalFlip(0.5),
                    transforms.ColorJitter(**COLOR_JITTER),
                    transforms.ToTensor(),
                ]
            )

        self.student_transform = pipeline(student_size)
        self.teacher_transform = pipeline(teacher_size)

    def __len__(self) -> int:
        return len(self.paths)

    def _render_pair(self, img: Image.Image, seed: int) -> tuple[Tensor, Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student = self.student_transform(img)
            torch.manual_seed(seed)
            teacher = self.teacher_transform(img)
        return student, teacher

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        rng = np.random.default_rng([self.seed, index])
        img = load_image(self.paths[index])
        students, teachers = [], []
        for _ in range(self.pos_num):
            seed = int(rng.integers(2**31 - 1))
            student, teacher = self._render_pair(img, seed)
            partner_img = load_image(self.paths[int(rng.integers(len(self.paths)))])
            partner_student, partner_teacher = self._render_pair(partner_img, seed)
            lam = float(rng.beta(_MIXUP_ALPHA, _MIXUP_ALPHA))
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


_Mixer = Callable[[Any], tuple[Tensor, Tensor]]


def _partner_mixer() -> _Mixer:
    pool = BufferPool()  # the outputs' memory, recycled as the trainer's CPU mix does

    def mix(batch: Any) -> tuple[Tensor, Tensor]:
        student, teacher, partner_student, partner_teacher, lam, _ = batch
        return mix_partner_views(student, teacher, partner_student, partner_teacher, lam, pool=pool)

    return mix


def _batch_mixer(seed: int) -> _Mixer:
    generator = torch.Generator().manual_seed(seed)
    pool = BufferPool()

    def mix(batch: Any) -> tuple[Tensor, Tensor]:
        student, teacher, _ = batch
        # uint8 in: the float conversion is fused into the mix (see mixup_views).
        return mixup_views(student, teacher, generator, pool=pool)

    return mix


def _mix_none(batch: Any) -> tuple[Tensor, Tensor]:
    student, teacher, _ = batch  # the reference mixes inside its dataset
    return student, teacher


def _time_loader(loader: DataLoader, mix: _Mixer, num_batches: int, untimed: int = 0) -> dict[str, float]:
    """Wall seconds, this process's CPU seconds and coupled views for ``num_batches`` mixed batches, after
    ``untimed`` batches loaded and mixed before the timer starts (with worker processes: their start-up)."""
    views = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, batch in enumerate(loader):
        if i >= untimed + num_batches:
            break
        student, _ = mix(batch)
        if i < untimed:
            if i == untimed - 1:  # the timer starts now
                start, cpu_start = time.perf_counter(), time.process_time()
            continue
        views += student.shape[0] * student.shape[1]
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "coupled_views": views,
    }


def _best(runs: list[dict[str, float]], with_cpu: bool) -> dict[str, float]:
    best = {"coupled_views_per_s": max(r["coupled_views"] / r["seconds"] for r in runs)}
    if with_cpu:
        best["coupled_views_per_cpu_s"] = max(r["coupled_views"] / r["cpu_seconds"] for r in runs)
    return best


def _partner_decodes_per_view(dataset: CoupledViewDataset, indices: Sequence[int]) -> float:
    """Partner decodes per view of ``partners=True`` items (distinct partners other than the item itself)."""
    decodes = 0
    for index in indices:
        decodes += len(set(dataset.partner_draws(index).partners) - {index})
    return decodes / (len(indices) * dataset.pos_num)


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
    repeat: int = 1,
    backend: str | None = None,
) -> dict:
    """Measure coupled views per second of our three modes and of the reference's approach.

    Each repeat times the four pipelines once, in a rotating order (so that a slow spell of a shared
    machine does not always hit the same one); each rate reported is the best of the repeats.

    Args:
        image_paths: Images to draw from (with replacement).
        student_size: QR in pixels.
        teacher_size: DR in pixels.
        pos_num: Views per image ``P``.
        batch_size: Images per batch ``B``.
        workers: DataLoader worker processes (0 = in the main process: then per-CPU-second rates too).
        batches: Batches timed per run for each of our modes.
        baseline_batches: Batches per run for the baseline (default: ``min(batches, 2)`` with ``workers == 0``,
            it is slow; ``batches`` with workers). With workers, every run first loads one batch more, untimed
            (the workers' start-up and the pipeline's fill), and a baseline timed over another number of
            batches than our modes is not comparable per wall-second: the goals then read ``goal_met`` None.
        seed: Seed of the sampled indices and the views.
        repeat: Runs of each pipeline; the best is kept.
        backend: Resize backend of both our modes (default: each mode's default, see ``CoupledViewDataset``).

    Returns:
        A JSON-serialisable report: ``speedups`` (``{mode: {"cpu": ..., "wall": ...}}``), per mode and for
        the baseline the best rates, every run's seconds, CPU seconds and views; ``goals`` and whether each
        is met (per CPU-second with ``workers == 0``, else per wall-second); partner decodes per view; the
        settings, load average before and after, torch threads, CPU count, versions and date.

    Raises:
        ValueError: On no images, non-positive counts or an unknown backend.
    """
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("image_paths is empty: the benchmark needs at least one image.")
    for name, value in (("batch_size", batch_size), ("batches", batches), ("pos_num", pos_num), ("repeat", repeat)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}.")
    if backend is not None and backend not in RESIZE_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(RESIZE_BACKENDS)} or None, got {backend!r}.")
    if baseline_batches is None:
        baseline_batches = min(batches, 2) if workers == 0 else batches
    if baseline_batches < 1:
        raise ValueError(f"baseline_batches must be >= 1, got {baseline_batches}.")

    # with worker processes, a run's first batch carries their start-up: loaded before the timer, on every side
    untimed = 1 if workers > 0 else 0

    def make_loader(dataset: Dataset, num_batches: int) -> DataLoader:
        sampler = _RandomIndices(len(paths), (untimed + num_batches) * batch_size, seed)
        if isinstance(dataset, CoupledViewDataset):
            # as the trainer loads them (raml.engine.methods.coupled): each batch rendered in place
            indices = sampler.indices
            batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
            return DataLoader(dataset, **batch_loader_arguments(batches), num_workers=workers)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)

    sizes = (student_size, teacher_size, pos_num, seed)
    faithful = CoupledViewDataset(paths, *sizes, partners=True, alpha=_MIXUP_ALPHA, backend=backend)
    fused = CoupledViewDataset(paths, *sizes, partners=True, alpha=_MIXUP_ALPHA, backend=backend, fused=True)
    batch_mode = CoupledViewDataset(paths, *sizes, partners=False, backend=backend)
    reference = ReferenceMixupDataset(paths, *sizes)
    pipelines: dict[str, tuple[Dataset, _Mixer, int]] = {
        "faithful": (faithful, _partner_mixer(), batches),
        "fused": (fused, _partner_mixer(), batches),
        "batch": (batch_mode, _batch_mixer(seed), batches),
        "reference": (reference, _mix_none, baseline_batches),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in pipelines}
    load_start = _loadavg()
    # numba compiles the jitter/mix kernels on their first call (or loads them from its on-disk cache): timed
    # here once, apart, and reported; the timed runs below start warm.
    start, cpu_start = time.perf_counter(), time.process_time()
    warm_up()
    jit_first_call = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}
    logger.info("numba kernels' first call (compile or cache load): %s", jit_first_call)
    names = list(pipelines)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            dataset, mix, num_batches = pipelines[name]
            runs[name].append(_time_loader(make_loader(dataset, num_batches), mix, num_batches, untimed))
            logger.info("run %d/%d %s: %s", r + 1, repeat, name, runs[name][-1])

    with_cpu = workers == 0  # else the work runs in worker processes: this process's CPU time says nothing
    # per wall-second with workers, rates over different batch counts are not comparable (the workers run ahead)
    comparable = with_cpu or baseline_batches == batches
    if not comparable:
        logger.warning(
            "With --workers the baseline must time as many batches as our modes (%d, not %d): the goals are not "
            "measured.",
            batches,
            baseline_batches,
        )
    base = _best(runs["reference"], with_cpu)
    timed_indices = _RandomIndices(len(paths), batches * batch_size, seed).indices
    modes: dict[str, dict[str, Any]] = {}
    speedups: dict[str, dict[str, float]] = {}
    for name, description in (
        ("faithful", "partners=True + mix_partner_views (the reference's mixup partner and pixels)"),
        ("fused", "partners=True, fused=True + mix_partner_views (--fused-views)"),
        ("batch", "partners=False + mixup_views (a view of another image of the batch)"),
    ):
        dataset = pipelines[name][0]
        best = _best(runs[name], with_cpu)
        speedup = {"wall": best["coupled_views_per_s"] / base["coupled_views_per_s"]}
        if with_cpu:
            speedup["cpu"] = best["coupled_views_per_cpu_s"] / base["coupled_views_per_cpu_s"]
        speedups[name] = speedup
        modes[name] = {
            "description": description,
            "backend": dataset.backend,
            "fused": dataset.fused,
            **best,
            "speedup": speedup["wall"],
            **({"speedup_cpu": speedup["cpu"]} if with_cpu else {}),
            "goal": GOALS[name],
            "goal_met": speedup.get("cpu", speedup["wall"]) >= GOALS[name] if comparable else None,
            "runs": runs[name],
        }
    modes["faithful"]["partner_decodes_per_view"] = _partner_decodes_per_view(faithful, timed_indices)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    report = {
        "speedups": speedups,
        "goals": {"per": "cpu_second" if with_cpu else "wall_second", **GOALS},
        # False: the baseline timed another number of batches than our modes with workers; no goal_met then
        "comparable": comparable,
        "modes": modes,
        "baseline": {
            "description": "the reference's AugFineGrainTS approach with its mixup partner (torchvision, per view)",
            **base,
            "partner_decodes_per_view": 1.0,
            "runs": runs["reference"],
        },
        "settings": {
            "image_size": student_size,
            "teacher_image_size": teacher_size,
            "pos_num": pos_num,
            "batch_size": batch_size,
            "workers": workers,
            "batches": batches,
            "baseline_batches": baseline_batches,
            "untimed_batches_per_run": untimed,
            "repeat": repeat,
            "num_images": len(paths),
            "seed": seed,
        },
        "jit_first_call": {
            **jit_first_call,
            "note": "numba's compile (first run after install) or on-disk cache load, before and not in the timed runs",
        },
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "torch_threads": torch.get_num_threads(),
        "cpus_available": cpus,
        "machine": platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
        "pillow_version": PIL.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for name, speedup in speedups.items():
        logger.info(
            "%s: %.1f coupled views/s vs reference %.1f: %.2fx wall%s (goal %.0fx)",
            name,
            modes[name]["coupled_views_per_s"],
            base["coupled_views_per_s"],
            speedup["wall"],
            f", {speedup['cpu']:.2f}x per CPU-second" if "cpu" in speedup else "",
            GOALS[name],
        )
    return report


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not available on this platform
        return None


def build_parser() -> argparse.ArgumentParser:
    """The ``raml bench pipeline`` argument parser (:func:`raml.bench.parsers.pipeline_parser`)."""
    return parsers.pipeline_parser()


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
        ("--repeat", args.repeat),
    ):
        if value < 1:
            raise SystemExit(f"raml bench pipeline: {flag} must be >= 1, got {value}.")
    if args.workers < 0:
        raise SystemExit(f"raml bench pipeline: --workers must be >= 0, got {args.workers}.")
    if args.baseline_batches is not None and args.baseline_batches < 1:
        raise SystemExit(f"raml bench pipeline: --baseline-batches must be >= 1, got {args.baseline_batches}.")
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
            repeat=args.repeat,
            backend=args.backend,
        )
    report["settings"]["images"] = str(args.images) if args.images is not None else "synthetic 500x375 JPEG"
    text = json.dumps(report, indent=2)
    print(text)  # the report is this command's output
    if args.json is not None:
        atomic_write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
