"""The first run on a lent GPU (issue 23): training speed with and without ``--amp``, DDP, evaluation, latency.

On synthetic data and random weights (the GPU machine may have no network), in one run:

1. ``ts_aug`` training for ``--steps`` batches, once in float32 and once with ``--amp``: images/s and views/s
   (the epochs after the first, which warms up cuDNN's benchmark and the loader), the share of the wall time
   spent waiting for the data loader, the peak GPU memory.
2. The same training as two processes (``torchrun --nproc_per_node 2``, NCCL) when two GPUs exist.
3. The exact evaluation (:func:`raml.retrieval.metrics.retrieval_metrics`) of SOP-sized clustered embeddings
   on the device and on the CPU: the metrics must be equal; both times.
4. Query latency of the student at ``--image-size`` against the teacher at ``--teacher-image-size``, at
   batch 1 and 32 (median ms per image, forward only, float32).
5. ``raml serve``'s query network on the device (:class:`raml.deploy.service.TorchQueryEmbedder`): whether its
   TorchScript trace was kept (equal to the network bit for bit on the probe batches; on a GPU, cuDNN may pick
   other kernels for the trace, and the service then runs the network eagerly, with a warning), and the median ms
   of a batch of 32 through the service's path against the eager network.

It writes one JSON (``--json``; default ``<out>/gpu_check.json``, else ``./gpu_check.json``) and prints a
table. Without CUDA (and ``--device auto``) it says so and exits 0; a ``--device`` named but unusable here (``cuda``
without CUDA, ``cuda:1`` on one GPU) is refused in one line, exit 2. ``--device cpu --tiny`` runs every part on
the CPU at toy sizes in seconds (the smoke test of this script; its figures mean nothing).

Usage::

    python benchmarks/gpu_check.py [--out DIR] [--json PATH] [--device auto|cuda|cuda:1|cpu] [--tiny]
        [--steps N] [--workers N]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

try:
    import raml
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import raml

from raml.bench.eval import make_clustered_embeddings
from raml.data.synth import generate_synthetic_dataset
from raml.engine.config import TrainConfig
from raml.engine.device import prepare_cuda_device
from raml.engine.trainer import Trainer
from raml.models import build_network, save_checkpoint
from raml.models.cost import latency_ms_per_image
from raml.retrieval.metrics import retrieval_metrics
from raml.utils import atomic_write_text, cpu_model

logger = logging.getLogger("gpu_check")

NO_CUDA = "no CUDA device is visible: gpu_check needs a GPU, nothing was run (--device cpu --tiny runs a smoke test)"


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """Sizes of one check; :data:`FULL` fits in about 8 minutes on one recent GPU, :data:`TINY` in seconds."""

    arch: str
    image_size: int
    teacher_image_size: int
    pos_num: int
    batch_size: int
    steps: int
    update_every: int
    workers: int
    num_classes: int
    images_per_class: int
    source_size: int
    eval_images: int
    eval_dim: int
    eval_classes: int
    latency_batches: tuple[int, ...]
    latency_repeats: int


FULL = CheckSettings(
    arch="resnet50", image_size=224, teacher_image_size=448, pos_num=8, batch_size=8, steps=300, update_every=5,
    workers=min(8, os.cpu_count() or 1), num_classes=40, images_per_class=12, source_size=500,
    eval_images=60502, eval_dim=512, eval_classes=11316, latency_batches=(1, 32), latency_repeats=20,
)  # fmt: skip
TINY = CheckSettings(
    arch="test_resnet", image_size=16, teacher_image_size=32, pos_num=2, batch_size=4, steps=4, update_every=1,
    workers=0, num_classes=8, images_per_class=4, source_size=32, eval_images=400, eval_dim=16,
    eval_classes=100, latency_batches=(1, 4), latency_repeats=2,
)  # fmt: skip


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()})"


def tf32_settings(device: torch.device) -> dict[str, Any] | None:
    """Whether this run's float32 arithmetic on ``device`` is TensorFloat-32 (10-bit mantissa) where the GPU has it
    (compute capability 8.0 and later): PyTorch lets cuDNN convolutions use TF32 by default
    (``torch.backends.cudnn.allow_tf32``) but not matrix products (``torch.backends.cuda.matmul.allow_tf32``);
    raml changes neither, so its "fp32" training on such a GPU convolves in TF32. None off CUDA."""
    if device.type != "cuda":
        return None
    major, _minor = torch.cuda.get_device_capability(device)
    has_tf32 = major >= 8
    return {
        "gpu_has_tf32": has_tf32,
        "conv_tf32": has_tf32 and bool(torch.backends.cudnn.allow_tf32),
        "matmul_tf32": has_tf32 and bool(torch.backends.cuda.matmul.allow_tf32),
    }


def _fp32_label(report: dict[str, Any]) -> str:
    """The float32 training row's name, saying where its convolutions (or products) ran in TF32."""
    tf32 = report.get("tf32") or {}
    parts = [name for key, name in (("conv_tf32", "TF32 convs"), ("matmul_tf32", "TF32 matmuls")) if tf32.get(key)]
    return f"fp32 ({', '.join(parts)})" if parts else "fp32"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- data
def prepare_data(settings: CheckSettings, work: Path) -> tuple[Path, Path]:
    """A synthetic CUB-format dataset and a random-weights checkpoint of ``settings.arch`` (student and
    teacher start from it; nothing is downloaded).

    Both are reused from an earlier run into the same ``work`` folder only where they were made with the same
    settings: the data folder is named by its sizes (``data-<classes>x<images per class>x<side>``; a ``--tiny``
    run's data is never measured by a full run) and the checkpoint by its architecture, which alone decides it
    (whitening 512, seed 0).
    """
    data_root = work / f"data-{settings.num_classes}x{settings.images_per_class}x{settings.source_size}"
    if not (data_root / "cub" / "images.txt").exists():
        generate_synthetic_dataset(
            data_root / "cub",
            num_classes=settings.num_classes,
            images_per_class=settings.images_per_class,
            image_size=settings.source_size,
            seed=0,
        )
    network = work / f"{settings.arch}-random.pth"
    if not network.exists():
        torch.manual_seed(0)
        save_checkpoint(network, build_network(settings.arch, whitening=512, pretrained=False))
    return data_root, network


def _train_config(settings: CheckSettings, data_root: Path, network: Path, directory: Path, amp: bool) -> TrainConfig:
    # trainval = the first half of the classes; enough epochs for `steps` batches after one warm-up epoch
    epoch_images = settings.num_classes // 2 * settings.images_per_class
    batches_per_epoch = math.ceil(epoch_images / settings.batch_size)
    epochs = 1 + max(1, math.ceil(settings.steps / batches_per_epoch))
    return TrainConfig(
        mode="ts_aug", student_path=str(network), teacher_path=str(network), training_dataset="cub",
        test_datasets=[], data_root=str(data_root), directory=str(directory), image_size=settings.image_size,
        teacher_image_size=settings.teacher_image_size, pos_num=settings.pos_num, batch_size=settings.batch_size,
        update_every=min(settings.update_every, batches_per_epoch), workers=settings.workers, val=False,
        epochs=epochs, save_freq=10**6, lr=1e-4, lam_1=0.7, lam_2=0.7, amp=amp, overwrite=True,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- training
def measure_training(
    settings: CheckSettings, data_root: Path, network: Path, work: Path, device: torch.device, amp: bool
) -> dict[str, Any]:
    """Train ``ts_aug`` and time it: images/s and the share of the time spent waiting for the loader."""
    config = _train_config(settings, data_root, network, work / f"train-{'amp' if amp else 'fp32'}", amp)
    prepare_cuda_device(device, amp)
    trainer = Trainer(config, device, progress=False)
    waits: dict[int, float] = {}
    batches = trainer._epoch_batches

    def timed_batches(epoch: int, generator: torch.Generator) -> Iterator[Any]:
        iterator = iter(batches(epoch, generator))
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            waits[epoch] = waits.get(epoch, 0.0) + time.perf_counter() - start
            yield batch

    trainer._epoch_batches = timed_batches  # the loader's share: time blocked in next(), per epoch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.run()
    _sync(device)
    measured = trainer.history[1:] or trainer.history  # the first epoch warms up (cuDNN benchmark, workers)
    seconds = sum(h["seconds"] for h in measured)
    images = trainer.epoch_size * len(measured)
    return {
        "amp": amp,
        "amp_active": trainer.amp,
        "epochs_measured": len(measured),
        "batches_measured": trainer.batches_per_epoch * len(measured),
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 2),
        "views_per_s": round(images * settings.pos_num / seconds, 2),
        "loader_wait_share": round(sum(waits.get(h["epoch"], 0.0) for h in measured) / seconds, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "final_loss": trainer.history[-1].get("loss"),
    }


def measure_ddp(settings: CheckSettings, data_root: Path, network: Path, work: Path, device: torch.device) -> dict:
    """The fp32 training as two torchrun processes (NCCL), when two GPUs exist."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"skipped": "fewer than two CUDA devices"}
    config = _train_config(settings, data_root, network, work / "train-ddp", amp=False)
    args = [
        "train", "--mode", "ts_aug", "--student-path", str(network), "--teacher-path", str(network),
        "--training-dataset", "cub", "--test-datasets", "", "--data-root", str(data_root),
        "--directory", config.directory, "--image-size", str(config.image_size),
        "--teacher-image-size", str(config.teacher_image_size), "--pos-num", str(config.pos_num),
        "--batch-size", str(config.batch_size), "--update-every", str(config.update_every),
        "--workers", str(config.workers), "--no-val", "--epochs", str(config.epochs), "--save-freq", "1000000",
        "--lr", "1e-4", "--lam-1", "0.7", "--lam-2", "0.7", "--no-progress", "--overwrite",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "raml", *args]
    start = time.perf_counter()
    # the processes import raml as this one does (an install, or this checkout's src)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(raml.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"failed": f"exit status {result.returncode}", "stderr_tail": result.stderr[-2000:]}
    from raml.models import load_checkpoint_file

    history = load_checkpoint_file(Path(config.directory) / "model_last.pth.tar")["raml"]["history"]
    measured = history[1:] or history
    seconds = sum(h["seconds"] for h in measured)
    epoch_images = settings.num_classes // 2 * settings.images_per_class
    return {
        "processes": 2,
        "seconds": round(seconds, 3),
        "wall_seconds": round(wall, 1),
        "images_per_s": round(epoch_images * len(measured) / seconds, 2),
    }


# --------------------------------------------------------------------------------------- evaluation
def measure_evaluation(settings: CheckSettings, device: torch.device) -> dict[str, Any]:
    """Exact mAP/R@k of clustered embeddings (every image a query, self excluded) on the device and the CPU."""
    embeddings, labels = make_clustered_embeddings(settings.eval_images, settings.eval_dim, settings.eval_classes)
    ks = (1, 10, 100, 1000)
    results = {}
    for where in dict.fromkeys([device, torch.device("cpu")]):
        x = torch.from_numpy(embeddings).to(where)
        _sync(where)
        start = time.perf_counter()
        metrics = retrieval_metrics(x, x, labels, labels, ks=ks, exclude_self=True)
        _sync(where)
        results[str(where)] = {"seconds": round(time.perf_counter() - start, 3), "metrics": metrics}
    cpu_metrics, device_metrics = results["cpu"]["metrics"], results[str(device)]["metrics"]
    difference = max(abs(float(device_metrics[key]) - float(cpu_metrics[key])) for key in cpu_metrics)
    return {
        "num_images": settings.eval_images,
        "dim": settings.eval_dim,
        "device_seconds": results[str(device)]["seconds"],
        "cpu_seconds": results["cpu"]["seconds"],
        "max_metric_difference": difference,
        "equal": difference <= 1e-4,
        "metrics": cpu_metrics,
    }


# ------------------------------------------------------------------------------------------ latency
def measure_latency(settings: CheckSettings, network: Path, device: torch.device) -> list[dict[str, Any]]:
    """Median forward latency per image: the student at QR against the teacher at DR, at each batch size."""
    from raml.models import load_network

    model = load_network(network, device=device)
    rows = []
    for role, size in (("student", settings.image_size), ("teacher", settings.teacher_image_size)):
        for batch in settings.latency_batches:
            with torch.inference_mode():
                ms = latency_ms_per_image(model, size, device, batch_size=batch, repeats=settings.latency_repeats)
            rows.append({"role": role, "image_size": size, "batch_size": batch, "ms_per_image": round(ms, 3)})
    return rows


# ---------------------------------------------------------------------------------- service network
def measure_service_graph(settings: CheckSettings, network: Path, device: torch.device) -> dict[str, Any]:
    """The service's query network on ``device``: the sizes whose trace was kept, and a batch of 32 through the
    module the service runs at ``--image-size`` (the trace where kept, else the network) against the eager network
    (median ms of ``latency_repeats`` after a warm-up, :func:`~raml.models.cost.latency_ms_per_image`)."""
    from raml.deploy.service import TorchQueryEmbedder
    from raml.models import load_network

    model = load_network(network, device=device)
    size = settings.image_size
    embedder = TorchQueryEmbedder(model, device, size)
    served = embedder.graphs.get(size, model)
    with torch.inference_mode():
        ms = {
            name: 32 * latency_ms_per_image(module, size, device, batch_size=32, repeats=settings.latency_repeats)
            for name, module in (("service", served), ("eager", model))
        }
    return {
        "image_size": size,
        "graph_sizes": sorted(embedder.graphs),
        "service_ms_batch32": round(ms["service"], 3),
        "eager_ms_batch32": round(ms["eager"], 3),
    }


# -------------------------------------------------------------------------------------------- report
def format_report(report: dict[str, Any]) -> str:
    lines = [f"gpu_check on {report['device_name']} (torch {report['torch']}, built for CUDA {report['cuda']})", ""]
    lines.append("| training | amp active | images/s | views/s | loader wait | peak GiB |")
    lines.append("|---|---|---|---|---|---|")
    fp32 = _fp32_label(report)
    for row in report["training"]:
        if "refused" in row or "failed" in row:
            why = f"refused: {row['refused']}" if "refused" in row else f"failed: {row['failed']}"
            lines.append(f"| ts_aug {'--amp' if row['amp'] else fp32} | {why} | | | | |")
            continue
        lines.append(
            f"| ts_aug {'--amp' if row['amp'] else fp32} | {row['amp_active']} | {row['images_per_s']} | "
            f"{row['views_per_s']} | {row['loader_wait_share']:.0%} | {row['peak_memory_gib']} |"
        )
    ddp = report["ddp"]
    lines.append(f"| torchrun x2 ({fp32}) | False | {ddp.get('images_per_s', '-')} | | | |")
    if "skipped" in ddp or "failed" in ddp:
        lines.append(f"  torchrun: {ddp.get('skipped') or ddp.get('failed')}")
    ev = report["evaluation"]
    lines.append("")
    if "failed" in ev:
        lines.append(f"exact evaluation: failed: {ev['failed']}")
    else:
        lines.append(
            f"exact evaluation of {ev['num_images']} x {ev['dim']}-d embeddings: device {ev['device_seconds']} s, "
            f"CPU {ev['cpu_seconds']} s, metrics equal: {ev['equal']} (max difference "
            f"{ev['max_metric_difference']:.2e})"
        )
    lines += ["", "| network | size | batch | ms/image |", "|---|---|---|---|"]
    latency = report["latency"]
    if isinstance(latency, dict):  # {"failed": ...}
        lines.append(f"| latency failed: {latency.get('failed')} | | | |")
    else:
        for row in latency:
            lines.append(f"| {row['role']} | {row['image_size']} | {row['batch_size']} | {row['ms_per_image']} |")
    graph = report.get("service_graph")
    if graph and "failed" in graph:
        lines += ["", f"raml serve's query network: failed: {graph['failed']}"]
    elif graph:
        kept = "kept" if graph["image_size"] in graph["graph_sizes"] else "NOT kept (the service runs it eagerly)"
        lines += [
            "",
            f"raml serve's query network at {graph['image_size']} px: trace {kept}; a batch of 32 "
            f"{graph['service_ms_batch32']} ms through the service, {graph['eager_ms_batch32']} ms eager",
        ]
    return "\n".join(lines)


def _part(report: dict[str, Any], name: str, measure: Callable[[], Any], saved: Callable[[dict], None]) -> None:
    """``report[name] = measure()``; a part that fails is recorded as ``{"failed": ...}`` and the others still
    run (a GPU session's minutes are counted: one failure must not lose the other figures); the report so far is
    saved after each part."""
    try:
        report[name] = measure()
    except Exception as error:  # noqa: BLE001 - recorded in the report, with its traceback in the log
        logger.exception("gpu_check: the %s part failed", name)
        report[name] = {"failed": f"{type(error).__name__}: {error}"[:2000]}
    saved(report)


def run_check(
    settings: CheckSettings, device: torch.device, work: Path, saved: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Every part of the check on ``device``; returns the report (see the module docstring). ``saved`` is called
    with the report after each part (``main`` writes the JSON then)."""
    saved = saved or (lambda report: None)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": _device_name(device),
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "tf32": tf32_settings(device),
        "loadavg_start": _loadavg(),
        "settings": dataclasses.asdict(settings),
    }
    data_root, network = prepare_data(settings, work)
    report["training"] = []
    for amp in (False, True):
        try:
            report["training"].append(measure_training(settings, data_root, network, work, device, amp))
        except ValueError as error:  # --amp refused: this GPU has no native bf16
            report["training"].append({"amp": amp, "refused": str(error)})
        except Exception as error:  # noqa: BLE001 - recorded; the other parts still run
            logger.exception("gpu_check: the training part (amp %s) failed", amp)
            report["training"].append({"amp": amp, "failed": f"{type(error).__name__}: {error}"[:2000]})
        saved(report)
    _part(report, "ddp", lambda: measure_ddp(settings, data_root, network, work, device), saved)
    _part(report, "evaluation", lambda: measure_evaluation(settings, device), saved)
    _part(report, "latency", lambda: measure_latency(settings, network, device), saved)
    _part(report, "service_graph", lambda: measure_service_graph(settings, network, device), saved)
    report["loadavg_end"] = _loadavg()
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA if present; else exit 0), cuda, cuda:1, cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a smoke test in seconds)")
    parser.add_argument("--steps", type=int, help="training batches measured per run (default: 300, tiny 4)")
    parser.add_argument("--workers", type=int, help="data loader workers (default: min(8, CPUs), tiny 0)")
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="report path (default: <out>/gpu_check.json, else ./gpu_check.json)")
    return parser


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names (``auto``: the first CUDA device); a ValueError saying why where it cannot
    run here: not a device name, CUDA asked for where none is usable, or an index past the visible devices."""
    try:
        device = torch.device("cuda" if name == "auto" else name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device: pass auto, cpu, cuda or cuda:<index>.") from error
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: gpu_check runs on CUDA or the CPU; pass auto, cpu, cuda or cuda:<index>.")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: no CUDA device is usable here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); run it on a machine with an NVIDIA GPU, or pass --device cpu --tiny."
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"--device {name}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1}); "
            "pass one of them, or check CUDA_VISIBLE_DEVICES."
        )
    return device


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "auto" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        print(f"gpu_check: error: {error}", file=sys.stderr)
        return 2
    settings = TINY if args.tiny else FULL
    changes = {k: v for k, v in (("steps", args.steps), ("workers", args.workers)) if v is not None}
    settings = dataclasses.replace(settings, **changes)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        work = args.out or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        json_path = args.json or (args.out / "gpu_check.json" if args.out else Path("gpu_check.json"))

        def save(report: dict[str, Any]) -> None:  # after each part: a later failure or time-out keeps these
            atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")

        report = run_check(settings, device, work, save)
        save(report)
    print(format_report(report))
    print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
