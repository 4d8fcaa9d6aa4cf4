"""The main job: the paper's story on built-in synthetic data, end to end, on a CPU in minutes.

1. Generate a synthetic fine-grained dataset in the CUB-200-2011 format (``raml.data.synth``).
2. Train a teacher from random weights at the large size DR with labels (``--mode sym``).
3. Distil a student at the small size QR = DR / 2 from it without labels (``--mode ts_aug``).
4. Test five settings on the held-out classes and measure each query network's cost.
5. Draw ``gallery.png``: for a few held-out queries, the top-5 of the teacher's DR database for the
   undistilled teacher at QR and for the distilled student at QR, side by side (:func:`demo_gallery_rows`).
6. Write :data:`RESULT_FILES` into the output folder (``results.json``, ``results.md``, ``settings.json``,
   ``tradeoff.png``, ``gallery.png``), all at the end, ``results.json`` last (:func:`write_result_files`).

Every number in the outputs is measured in the run; nothing is filled in. On a CPU the accuracies and FLOPs
are reproducible bit for bit: every stage is seeded (network initialisation draws from torch's global
generator, which a fresh process seeds at random), torch runs on ``threads`` intra-op threads (a reduction
split over another thread count sums in another order) with deterministic algorithms, and ``results.json``
records the software stack and the processor that produced them. Only the latency (``query_ms``) and the
run time are measured, not reproduced: ``TIMING_KEYS``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from raml.data.splits import get_split
from raml.data.synth import generate_synthetic_dataset
from raml.deploy.gallery import GalleryRow, Hit, render_gallery, write_gallery
from raml.engine.config import TrainConfig
from raml.engine.trainer import Trainer
from raml.models import load_network
from raml.models.cost import gflops_per_image, latency_ms_per_image
from raml.retrieval.evaluate import evaluate_split
from raml.retrieval.extract import extract_embeddings
from raml.utils import (
    MAX_SEED,
    MAX_THREADS,
    MAX_WORKERS,
    atomic_path,
    atomic_write_text,
    cpu_model,
    fsync_directory,
    seed_everything,
)

logger = logging.getLogger(__name__)

DATASET = "synth"
#: measured, not reproduced: left out of every equality check of two runs' results
TIMING_KEYS = frozenset({"query_ms"})
#: the packages whose versions decide the numbers (besides the processor and the thread count)
STACK_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow")
#: the gallery: this many held-out queries (the first image of evenly spaced test classes), top-k each
GALLERY_QUERIES = 4
GALLERY_K = 5
#: the result files the demo writes into its output folder (besides the data/, teacher/ and student/ folders),
#: in the order they are put in place: each is written in full to a temporary file first, and results.json,
#: which says that a run finished, is renamed into place last
RESULT_FILES = ("gallery.png", "tradeoff.png", "settings.json", "results.md", "results.json")
#: how an interrupted demo continues, in the trainer's stop message (raml demo has no --resume-student)
#: the largest --classes and --images-per-class: raml data synth's (``raml.cli.data.MAX_SYNTH_CLASSES`` and
#: ``MAX_SYNTH_IMAGES_PER_CLASS``), far above any use; past them the dataset's generation only exhausts the memory
MAX_CLASSES = 100_000
MAX_IMAGES_PER_CLASS = 10_000
RESUME_HINT = "Run raml demo again to start over: it trains the teacher and the student from scratch."


@dataclass
class DemoSettings:
    """Everything the demo does; the defaults run in a few minutes on 2 CPU cores."""

    out: Path = Path("demo")
    num_classes: int = 60
    images_per_class: int = 16
    image_size: int = 64
    # pattern period in pixels of a 128 px image: 11-14 px at DR = 64 and 5.5-7 px at QR = 32, so the fine
    # detail survives at QR but the teacher, trained at DR, sees it at the wrong scale there
    pattern_period: tuple[float, float] = (22.0, 28.0)
    architecture: str = "resnet18"
    whitening: int = 128
    teacher_size: int = 64
    student_size: int = 32
    teacher_epochs: int = 15
    teacher_lr: float = 1e-3
    teacher_batch_size: int = 32
    student_epochs: int = 10
    student_lr: float = 3e-4
    pos_num: int = 4
    lam_1: float = 0.7
    lam_2: float = 0.7
    seed: int = 0
    workers: int = 0
    # torch intra-op threads for the whole run: the numbers are bit-identical only for the same count (and the
    # same software and processor); 2 is what the README's table was measured with
    threads: int = 2
    latency_batch: int = 16

    def validate(self) -> None:
        """Refuse settings the demo cannot run, before it generates or trains anything (each message names the
        ``raml demo`` flag)."""
        from raml.models.backbones import resolve_architecture

        if self.num_classes < 4 or self.num_classes % 2 or self.num_classes > MAX_CLASSES:
            raise ValueError(
                f"--classes must be even and from 4 to {MAX_CLASSES:,} (half train, half test; training needs at "
                f"least 2 classes), got {self.num_classes}."
            )
        if not 2 <= self.images_per_class <= MAX_IMAGES_PER_CLASS:
            raise ValueError(
                f"--images-per-class must be from 2 to {MAX_IMAGES_PER_CLASS:,} (the teacher learns from pairs of "
                f"one class), got {self.images_per_class}."
            )
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be from 0 to {MAX_WORKERS}, got {self.workers}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be from 0 to 2**63 - 1, got {self.seed}.")
        if not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"--threads must be from 1 to {MAX_THREADS}, got {self.threads}.")
        try:
            resolve_architecture(self.architecture)
        except ValueError as error:
            raise ValueError(f"--architecture: {error}") from None


def generate_dataset(settings: DemoSettings, data_root: Path, progress: bool = True) -> None:
    """Write the demo's synthetic dataset unless the same settings already produced it (also used by the
    benchmarks that reuse the demo's data)."""
    folder = data_root / DATASET
    stamp = folder / "raml_synth.json"
    wanted = {
        "num_classes": settings.num_classes,
        "images_per_class": settings.images_per_class,
        "image_size": settings.image_size,
        "pattern_period": list(settings.pattern_period),
        "seed": settings.seed,
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and (folder / "images.txt").is_file():
        logger.info("Reusing the synthetic dataset in %s", folder)
        return
    # The images' names do not depend on the settings, so a build stopped part-way leaves a mix of the old and
    # the new settings' images: remove the old stamp (durably) before writing any, and stamp only a finished build.
    try:
        stamp.unlink()
    except FileNotFoundError:
        pass
    else:
        fsync_directory(folder)
    generate_synthetic_dataset(
        folder,
        num_classes=settings.num_classes,
        images_per_class=settings.images_per_class,
        image_size=settings.image_size,
        seed=settings.seed,
        progress=progress,
        pattern_period=settings.pattern_period,
    )
    atomic_write_text(stamp, json.dumps(wanted))


def train_config(settings: DemoSettings, data_root: Path, directory: Path, **values: Any) -> TrainConfig:
    """The demo's training settings (its data, no downloads, no model selection) updated with ``values``; also the
    base of the benchmarks that reuse the demo's data."""
    base: dict[str, Any] = dict(
        training_dataset=DATASET,
        trainval=True,  # the demo does no model selection: train on all training classes, test on the rest
        val=False,
        test_datasets=[],
        data_root=str(data_root),
        directory=str(directory),
        pretrained=False,  # no downloads: everything starts from random weights
        freeze_bn=False,  # ...so BatchNorm statistics must learn too
        whitening=settings.whitening,
        workers=settings.workers,
        eval_batch_size=64,
        print_freq=5,
        save_freq=1000,
        query_size=10**9,  # every training image, every epoch
        seed=settings.seed,
        overwrite=True,  # the demo owns its output folder
    )
    base.update(values)
    return TrainConfig(**base)


def train_teacher(settings: DemoSettings, data_root: Path, device: torch.device, progress: bool) -> Path:
    """Labels, random weights, DR. A normalised-softmax (proxy) loss learns fast from scratch on a CPU."""
    config = train_config(
        settings,
        data_root,
        settings.out / "teacher",
        mode="sym",
        loss="normsoftmax",
        student=settings.architecture,
        image_size=settings.teacher_size,
        teacher_image_size=settings.teacher_size,
        epochs=settings.teacher_epochs,
        lr=settings.teacher_lr,
        batch_size=settings.teacher_batch_size,
        update_every=1,
    )
    return Trainer(config, device, progress=progress, resume_hint=RESUME_HINT).run().best_checkpoint


def distil_student(
    settings: DemoSettings, data_root: Path, teacher: Path, device: torch.device, progress: bool
) -> Path:
    """No labels: coupled views at QR (student) and DR (teacher), the paper's loss. Starts from the teacher."""
    config = train_config(
        settings,
        data_root,
        settings.out / "student",
        mode="ts_aug",
        student_path=str(teacher),
        teacher_path=str(teacher),
        image_size=settings.student_size,
        teacher_image_size=settings.teacher_size,
        epochs=settings.student_epochs,
        lr=settings.student_lr,
        lam_1=settings.lam_1,
        lam_2=settings.lam_2,
        pos_num=settings.pos_num,
        batch_size=8,
        update_every=1,
        freeze_bn=True,  # the teacher's statistics are good ones: keep them, as the paper does
    )
    return Trainer(config, device, progress=progress, resume_hint=RESUME_HINT).run().best_checkpoint


def evaluate_settings(
    settings: DemoSettings,
    data_root: Path,
    teacher_path: Path,
    student_path: Path,
    device: torch.device,
    progress: bool,
) -> list[dict[str, Any]]:
    """The five rows of the demo's table, with each query network's cost."""
    split = get_split(f"{DATASET}-test", data_root)
    teacher = load_network(teacher_path, device=device)
    student = load_network(student_path, device=device)
    dr, qr = settings.teacher_size, settings.student_size
    ks = (1, 4)
    teacher_dr = evaluate_split(teacher, split, dr, device, sym=True, ks=ks, progress=progress)["sym"]
    teacher_qr = evaluate_split(
        teacher, split, qr, device, teacher=teacher, teacher_image_size=dr, sym=True, ks=ks, progress=progress
    )
    student_qr = evaluate_split(
        student, split, qr, device, teacher=teacher, teacher_image_size=dr, sym=True, ks=ks, progress=progress
    )
    rows_in = [
        ("teacher DR / DR (symmetric)", "teacher", dr, "teacher", dr, teacher_dr),
        ("teacher QR / QR (symmetric)", "teacher", qr, "teacher", qr, teacher_qr["sym"]),
        ("teacher QR / teacher DR (asymmetric, no distillation)", "teacher", qr, "teacher", dr, teacher_qr["asym"]),
        ("student QR / QR (symmetric)", "student", qr, "student", qr, student_qr["sym"]),
        ("student QR / teacher DR (asymmetric, the method)", "student", qr, "teacher", dr, student_qr["asym"]),
    ]
    networks = {"teacher": teacher, "student": student}
    cost: dict[tuple[str, int], tuple[float, float]] = {}
    rows = []
    for setting, query_net, query_size, db_net, db_size, metrics in rows_in:
        key = (query_net, query_size)
        if key not in cost:
            network = networks[query_net]
            cost[key] = (
                gflops_per_image(network, query_size, device),
                latency_ms_per_image(network, query_size, device, batch_size=settings.latency_batch),
            )
        rows.append(
            {
                "setting": setting,
                "query_network": query_net,
                "query_size": query_size,
                "database_network": db_net,
                "database_size": db_size,
                "mAP": round(metrics["mAP"], 2),
                "R@1": round(metrics["R@1"], 2),
                "R@4": round(metrics["R@4"], 2),
                "query_gflops": round(cost[key][0], 4),
                "query_ms": round(cost[key][1], 3),
            }
        )
    return rows


def gallery_query_ids(labels: Sequence[int], num_queries: int) -> list[int]:
    """The first image of ``num_queries`` evenly spaced classes (all classes when there are fewer)."""
    first: dict[int, int] = {}
    for i, label in enumerate(labels):
        first.setdefault(int(label), i)
    classes = sorted(first)
    count = min(num_queries, len(classes))
    picks = [classes[(j * len(classes)) // count] for j in range(count)]
    return [first[c] for c in picks]


def demo_gallery_rows(
    paths: Sequence[str],
    labels: Sequence[int],
    database: torch.Tensor,
    queries: Sequence[torch.Tensor],
    query_ids: Sequence[int],
    k: int,
) -> list[GalleryRow]:
    """Gallery rows: for each query id, one panel per query-embedding matrix with its top-k database images.

    Args:
        paths: The N images (database and queries are the same images, as in the test protocol).
        labels: Their N labels.
        database: ``(N, D)`` L2-normalised database embeddings.
        queries: Query embedding matrices ``(N, D)``, one per panel (e.g. teacher and student at QR).
        query_ids: The images used as queries.
        k: Results per panel.

    The query's own image is left out of its results (it is junk in the protocol); ties keep database order.
    """
    rows = []
    for q in query_ids:
        panels = []
        for matrix in queries:
            scores = database @ matrix[q]
            scores[q] = -float("inf")
            order = torch.sort(scores, descending=True, stable=True).indices[:k]
            panels.append([Hit(str(paths[i]), int(labels[i]), float(scores[i])) for i in order.tolist()])
        rows.append(GalleryRow(str(paths[q]), panels, int(labels[q])))
    return rows


def demo_gallery(
    settings: DemoSettings,
    data_root: Path,
    teacher_path: Path,
    student_path: Path,
    device: torch.device,
    progress: bool,
) -> tuple[list[GalleryRow], list[str]]:
    """The rows and panel titles of ``gallery.png``: held-out queries at QR by the teacher (no distillation) and
    by the student, top-5 of the teacher's DR database each."""
    split = get_split(f"{DATASET}-test", data_root)
    teacher = load_network(teacher_path, device=device)
    student = load_network(student_path, device=device)
    dr, qr = settings.teacher_size, settings.student_size
    paths = [str(p) for p in split.abspaths()]
    database = extract_embeddings(teacher, paths, dr, device, progress=progress, description=f"gallery teacher@{dr}")
    queries = [
        extract_embeddings(net, paths, qr, device, progress=progress, description=f"gallery {name}@{qr}")
        for name, net in (("teacher", teacher), ("student", student))
    ]
    rows = demo_gallery_rows(
        paths, split.labels, database, queries, gallery_query_ids(split.labels, GALLERY_QUERIES), GALLERY_K
    )
    titles = [
        f"teacher @ {qr} px queries (no distillation), teacher @ {dr} px database",
        f"student @ {qr} px queries (distilled), teacher @ {dr} px database",
    ]
    return rows, titles


def write_demo_gallery(
    settings: DemoSettings,
    data_root: Path,
    teacher_path: Path,
    student_path: Path,
    device: torch.device,
    path: Path,
    progress: bool,
) -> Path:
    """Write ``gallery.png`` (:func:`demo_gallery`) at ``path``."""
    rows, titles = demo_gallery(settings, data_root, teacher_path, student_path, device, progress)
    return write_gallery(rows, path, titles)


def summary(rows: list[dict[str, Any]]) -> str:
    """One sentence that says what the table shows, computed from the rows."""
    teacher_dr, _, baseline, _, method = rows
    ratio = method["query_gflops"] / teacher_dr["query_gflops"]
    before, after = f"{baseline['mAP']:.1f}", f"{method['mAP']:.1f}"
    # the verb from the figures as printed: a run where distillation hurts must not read as a gain
    if float(after) > float(before):
        verb, change = "lifts", f"from {before} to {after} mAP"
    elif float(after) < float(before):
        verb, change = "lowers", f"from {before} to {after} mAP"
    else:
        verb, change = "leaves", f"unchanged at {after} mAP"
    return (
        f"Distillation {verb} asymmetric retrieval (queries at {method['query_size']} px against the teacher's "
        f"{method['database_size']} px database) {change}, "
        f"against {teacher_dr['mAP']:.1f} for the teacher at {teacher_dr['query_size']} px on both sides, "
        f"at {ratio:.2f}x the teacher's query FLOPs."
    )


TABLE_HEADER = "| setting | query | database | mAP | R@1 | R@4 | query GFLOPs | query ms/image |"
TABLE_RULE = "|---|---|---|---|---|---|---|---|"


def results_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the rows (the one ``results.md``, the README and docs/demo.md show)."""
    lines = [TABLE_HEADER, TABLE_RULE]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['query_network']} @ {r['query_size']} px | {r['database_network']} @ "
            f"{r['database_size']} px | {r['mAP']:.2f} | {r['R@1']:.2f} | {r['R@4']:.2f} | "
            f"{r['query_gflops']:.4f} | {r['query_ms']:.2f} |"
        )
    return "\n".join(lines)


def parse_results_table(text: str) -> list[dict[str, Any]]:
    """The rows of the first ``results_table`` found in ``text``, typed as in ``results.json`` (the inverse).

    Raises:
        ValueError: ``text`` holds no such table, or a row of it does not parse.
    """
    lines = text.splitlines()
    try:
        first = lines.index(TABLE_HEADER) + 2
    except ValueError:
        raise ValueError(f"No demo results table (a line {TABLE_HEADER!r}) found.") from None
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 8:
            raise ValueError(f"A demo table row needs 8 cells, got {len(cells)}: {line!r}")
        (query_net, query_size), (db_net, db_size) = (_network_at(cell) for cell in cells[1:3])
        rows.append(
            {
                "setting": cells[0],
                "query_network": query_net,
                "query_size": query_size,
                "database_network": db_net,
                "database_size": db_size,
                "mAP": float(cells[3]),
                "R@1": float(cells[4]),
                "R@4": float(cells[5]),
                "query_gflops": float(cells[6]),
                "query_ms": float(cells[7]),
            }
        )
    return rows


def _network_at(cell: str) -> tuple[str, int]:
    """``"teacher @ 64 px"`` -> ``("teacher", 64)``."""
    network, _, size = cell.partition(" @ ")
    if not size.endswith(" px"):
        raise ValueError(f"Expected '<network> @ <size> px', got {cell!r}.")
    return network, int(size[: -len(" px")])


def results_markdown(rows: list[dict[str, Any]], settings: DemoSettings, seconds: float, stack: dict[str, Any]) -> str:
    """``results.md``: title, table, summary sentence, then one paragraph each on the settings and the stack."""
    versions = ", ".join(f"{name} {stack.get(name)}" for name in STACK_PACKAGES)
    where = stack.get("gpu") or stack["cpu"]
    return (
        "# raml demo results\n\n"
        + results_table(rows)
        + f"\n\n{summary(rows)}\n\n"
        + f"Dataset: synthetic, {settings.num_classes} classes x {settings.images_per_class} images "
        f"({settings.num_classes // 2} training classes, {settings.num_classes // 2} test classes); "
        f"{settings.architecture} from random weights, DR {settings.teacher_size} px, QR {settings.student_size} px; "
        f"teacher {settings.teacher_epochs} epochs, student {settings.student_epochs} epochs, seed {settings.seed}; "
        f"total {seconds / 60:.1f} min.\n\n"
        + f"Stack: {versions}, Python {stack['python']}; {stack['torch_threads']} torch threads, "
        f"device {stack['device']} ({where}).\n"
    )


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (mAP) against query cost (GFLOPs per image), one point per setting, as a PNG at ``path``."""
    with atomic_path(path) as tmp:
        _save_tradeoff(rows, tmp)


def _save_tradeoff(rows: list[dict[str, Any]], file: Path) -> None:
    """Draw :func:`plot_tradeoff`'s figure and save it as PNG to ``file``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"teacher": "o", "student": "*"}
    placed: list[tuple[float, float]] = []
    x_span = max(r["query_gflops"] for r in rows) or 1.0
    y_span = (max(r["mAP"] for r in rows) - min(r["mAP"] for r in rows)) or 1.0
    for i, r in enumerate(rows):
        x, y = r["query_gflops"], r["mAP"]
        ax.scatter(
            x,
            y,
            s=140 if r["query_network"] == "student" else 80,
            marker=markers[r["query_network"]],
            label=f"{i + 1}. {r['setting']}",
            zorder=3,
        )
        # labels of points that (nearly) coincide are stacked instead of printed over each other
        near = sum(abs(x - px) < 0.02 * x_span and abs(y - py) < 0.03 * y_span for px, py in placed)
        ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(8 + 9 * near, 4))
        placed.append((x, y))
    ax.set_xlim(left=0)
    ax.set_xlabel("query cost (GFLOPs per image)")
    ax.set_ylabel("mAP (%)")
    ax.set_title("Accuracy against query cost on the synthetic test classes")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        fig.savefig(file, format="png", dpi=120)
    finally:
        plt.close(fig)


@contextmanager
def reproducible(threads: int) -> Iterator[None]:
    """Run the block on ``threads`` intra-op threads with deterministic algorithms; restore both after.

    Deterministic algorithms only warn where an operation has no deterministic implementation (some CUDA
    kernels; none that the demo uses on a CPU), so that a GPU run still finishes.
    """
    if not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be from 1 to {MAX_THREADS}, got {threads}.")
    previous = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False  # cuDNN's autotuner may pick a different kernel on every run
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])
        torch.backends.cudnn.benchmark = previous[3]


def software_stack(device: torch.device) -> dict[str, Any]:
    """What decides the numbers besides the settings: package versions, thread count, processor, device."""
    versions = {}
    for name in STACK_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    stack: dict[str, Any] = {
        "python": platform.python_version(),
        **versions,
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "system": platform.system(),
        "device": str(device),
    }
    if device.type == "cuda":
        stack["gpu"] = torch.cuda.get_device_name(device)
        stack["cuda"] = torch.version.cuda
        stack["cudnn"] = torch.backends.cudnn.version()
    return stack


def comparable(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a ``results.json`` without the measured timings: what two runs must agree on exactly."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in results["rows"]]


def run_demo(settings: DemoSettings, device: torch.device, progress: bool = True) -> list[dict[str, Any]]:
    """Run the whole demo; returns the table rows (also written to ``settings.out``).

    ``results.json`` holds ``{"rows": [...], "stack": software_stack(...), "seconds": ...}``.
    """
    settings.validate()
    start = time.perf_counter()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    with reproducible(settings.threads):
        logger.info("1/4 generating the synthetic dataset")
        generate_dataset(settings, data_root)
        # Every stage starts from the seed, so that no stage depends on what an earlier one drew (or on the
        # random seed of a fresh process, which the teacher's initial weights would otherwise come from).
        logger.info("2/4 training the teacher at %d px (labels, random weights)", settings.teacher_size)
        seed_everything(settings.seed)
        teacher = train_teacher(settings, data_root, device, progress)
        logger.info("3/4 distilling the student at %d px (no labels)", settings.student_size)
        seed_everything(settings.seed)
        student = distil_student(settings, data_root, teacher, device, progress)
        logger.info("4/4 testing")
        seed_everything(settings.seed)
        rows = evaluate_settings(settings, data_root, teacher, student, device, progress)
        stack = software_stack(device)
        # after every number is measured: the gallery only reads the networks
        gallery_rows, gallery_titles = demo_gallery(settings, data_root, teacher, student, device, progress)
    seconds = time.perf_counter() - start
    settings_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}
    results = {"rows": rows, "stack": stack, "seconds": round(seconds, 1)}
    writers: dict[str, Callable[[Path], None]] = {
        "gallery.png": lambda file: render_gallery(gallery_rows, gallery_titles).save(file, format="PNG"),
        "tradeoff.png": lambda file: _save_tradeoff(rows, file),
        "settings.json": lambda file: file.write_text(
            json.dumps({**settings_dict, "seconds": round(seconds, 1)}, indent=2), encoding="utf-8"
        ),
        "results.md": lambda file: file.write_text(results_markdown(rows, settings, seconds, stack), encoding="utf-8"),
        "results.json": lambda file: file.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8"),
    }
    write_result_files(out, writers)
    return rows


def write_result_files(out: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write the demo's :data:`RESULT_FILES` into ``out``: every one in full to a temporary file first
    (``writers[name](temporary)``), then each renamed into place in :data:`RESULT_FILES` order, ``results.json``
    last. A failure while writing leaves every previous file as it was; a failure while renaming leaves
    ``results.json`` as it was, so a failed run never adds a complete-looking result."""
    if set(writers) != set(RESULT_FILES):
        raise ValueError(f"write_result_files needs one writer per file of {RESULT_FILES}, got {sorted(writers)}.")
    with ExitStack() as staged:
        # contexts leave in the reverse order: the last entered is renamed first
        temporaries = {name: staged.enter_context(atomic_path(out / name)) for name in reversed(RESULT_FILES)}
        for name in RESULT_FILES:
            writers[name](temporaries[name])
