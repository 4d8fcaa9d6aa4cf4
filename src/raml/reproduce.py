"""``raml reproduce``: the paper's table row for one dataset, end to end.

Steps (each network is tested on ``<dataset>-test``, every image a query against all the others):

1. the published teacher ``<dataset>-448r-resnet50-512-gem-w``, symmetric at DR (448 px); its embeddings
   are the database of every asymmetric test and are cached (``<data_root>/cache/embeddings``), so a second
   run, the published student's test and the distilled student's test all reuse them;
2. the published student ``<dataset>-S224r-T448r-resnet50-512-gem-w``: asymmetric (queries at QR against the
   teacher's database at DR) and symmetric (at QR);
3. a student distilled now with ``configs/<dataset>.yaml`` (the paper's hyper-parameters), in
   ``<out>/distill``; an interrupted distillation continues from its last finished epoch;
4. that student, tested as in 2.

Outputs ``<out>/reproduce.json`` and ``<out>/reproduce.md`` (rewritten after every step): one row per network
with asym/sym mAP and R@1, the paper's numbers (:data:`PAPER_RESULTS`) beside them and the difference, the
wall time and the device. Before any work, a rough duration estimate for the device, from a timed probe of
forward passes (see :func:`estimate_duration` for what it counts and assumes).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from raml.data.splits import get_split
from raml.engine.config import RUN_CONFIG_NAME, TrainConfig, load_yaml_config
from raml.engine.methods import method_class
from raml.engine.methods.coupled import CoupledViewMethod
from raml.engine.trainer import Trainer
from raml.models import build_network, load_network
from raml.models.cost import latency_ms_per_image
from raml.retrieval.cache import EmbeddingCache
from raml.retrieval.evaluate import default_ks, evaluate_split
from raml.retrieval.extract import extract_embeddings
from raml.retrieval.metrics import retrieval_metrics
from raml.utils import atomic_write_text, cpu_model, file_sha256

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's table (the authors' README, :data:`PAPER_SOURCE_URL`; ResNet50, GeM, 512-d
    whitening, DR 448, QR 224, seed 1234): the optimised hyper-parameters and the distilled student's results in %."""

    lr: float
    lam_1: float
    lam_2: float
    asym_map: float
    asym_r1: float
    sym_map: float
    sym_r1: float

    def metrics(self) -> dict[str, dict[str, float]]:
        return {"asym": {"mAP": self.asym_map, "R@1": self.asym_r1}, "sym": {"mAP": self.sym_map, "R@1": self.sym_r1}}


#: Where :data:`PAPER_RESULTS` comes from: the table "Optimized hyperparameters for each dataset and the default seed
#: (1234) along with the resulting score" in the README of the authors' code release, at this commit. That README
#: accompanies Suma & Tolias, "Large-to-small Image Resolution Asymmetry in Deep Metric Learning", WACV 2023,
#: arXiv:2210.05463 (it links the unversioned abstract page; v1 is dated 11 Oct 2022). These are the numbers of the
#: released models with the optimised hyper-parameters; they were not checked here against the tables of the PDF.
PAPER_SOURCE_URL = "https://github.com/pavelsuma/raml/blob/140f34e99ffc6568d2a2e8fbf2c38f4335964f66/README.md"
PAPER_ARXIV = "arXiv:2210.05463"

PAPER_RESULTS: dict[str, PaperRow] = {
    "cub": PaperRow(1.4025e-4, 0.7718, 0.6684, 40.80, 70.43, 41.08, 71.79),
    "cars": PaperRow(1.1692e-4, 0.6371, 0.7731, 39.43, 85.06, 40.19, 86.87),
    "sop": PaperRow(1.7579e-4, 0.7482, 0.6778, 60.23, 81.14, 60.49, 81.44),
}
"""The paper's numbers (source: :data:`PAPER_SOURCE_URL`), the one place in the code that holds them; the README's
table is checked against this constant, and nothing else holds a copy."""

METRICS = ("mAP", "R@1")
TRAIN_STEP_FORWARDS = 3.0
"""Assumed cost of a training step (forward + backward) per view, in forward passes (backward ~ 2 forwards)."""
#: settings that do not change what a distillation computes; an existing run may differ in these
RUNTIME_KEYS = frozenset(
    {"resume_student", "overwrite", "workers", "device", "gpu_id", "json", "print_freq", "comment", "data_root"}
)
#: how an interrupted distillation continues, in the trainer's stop message (raml reproduce has no
#: --resume-student: run again, it continues from the last finished epoch by itself, see _resume_settings)
RESUME_HINT = (
    "Run the same raml reproduce command again: it continues the distillation from its last finished epoch (from "
    "the start when none finished)."
)


def teacher_name(dataset: str) -> str:
    return f"{dataset}-448r-resnet50-512-gem-w"


def student_name(dataset: str) -> str:
    return f"{dataset}-S224r-T448r-resnet50-512-gem-w"


@dataclass(frozen=True)
class ReproduceOptions:
    """What ``raml reproduce`` was asked for.

    Attributes:
        dataset: ``cub``, ``cars`` or ``sop``.
        data_root: The folder holding the datasets, ``networks/`` and ``cache/``.
        out: Where the reports and the distillation (``distill/``) go.
        config: The distillation's YAML config (``configs/<dataset>.yaml``).
        device: Where everything runs.
        epochs: Shorten the distillation to this many epochs (None: the config's).
        image_size: QR for the tests and the distillation (None: the config's).
        teacher_image_size: DR (None: the config's).
        batch_size: Images per forward pass in the tests.
        workers: Data loader workers.
        progress: Show progress bars.
    """

    dataset: str
    data_root: Path
    out: Path
    config: Path
    device: torch.device
    epochs: int | None = None
    image_size: int | None = None
    teacher_image_size: int | None = None
    batch_size: int = 32
    workers: int = 0
    progress: bool = True


@dataclass
class NetworkRow:
    """One network's results (percent) and the paper's numbers for it, when the paper's table has them."""

    network: str
    checkpoint: str
    query_size: int
    database_size: int | None
    results: dict[str, dict[str, float]]
    paper: dict[str, dict[str, float]] | None

    def difference(self) -> dict[str, dict[str, float]]:
        if self.paper is None:
            return {}
        return {
            test: {m: round(self.results[test][m] - self.paper[test][m], 2) for m in METRICS}
            for test in self.results
            if test in self.paper
        }


@dataclass
class DurationEstimate:
    """A rough duration from a timed probe: forward ms per image of the student at QR and the teacher at DR."""

    student_ms: float
    teacher_ms: float
    full_epochs: int
    epochs: int
    full_s: float
    this_run_s: float
    basis: str

    def describe(self) -> str:
        text = f"Rough duration on this device: the full run ({self.full_epochs} epochs) ~{_duration(self.full_s)}"
        if self.epochs != self.full_epochs:
            text += f"; this run (--epochs {self.epochs}) ~{_duration(self.this_run_s)}"
        return f"{text}. {self.basis}"


@dataclass
class ReproduceReport:
    dataset: str
    device: str
    config: str
    epochs: int
    config_epochs: int
    image_size: int
    teacher_image_size: int
    started: str
    estimate: DurationEstimate | None = None
    rows: list[NetworkRow] = field(default_factory=list)
    wall_time_s: float = 0.0
    #: the first epoch this run trained (1: a fresh distillation; > epochs: an earlier run had finished it)
    distill_start_epoch: int | None = None
    status: str = "running"

    @property
    def shortened(self) -> bool:
        return self.epochs < self.config_epochs

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["shortened"] = self.shortened
        payload["paper_source"] = {"url": PAPER_SOURCE_URL, "paper": PAPER_ARXIV}  # where each row's "paper" is from
        payload["rows"] = [{**asdict(row), "difference": row.difference()} for row in self.rows]
        return payload


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({cpu_model()}, {os.cpu_count()} cores, {platform.machine()})"


# ------------------------------------------------------------------------------------------------ config
def distillation_config(options: ReproduceOptions) -> TrainConfig:
    """The config file's settings, with this run's dataset, data root, directory, device and overrides."""
    values = load_yaml_config(options.config)
    configured = values.get("training_dataset", options.dataset)
    if configured != options.dataset:
        logger.warning("%s trains on %r; reproducing %r instead.", options.config, configured, options.dataset)
    values.update(
        training_dataset=options.dataset,
        test_datasets=[f"{options.dataset}-test"],
        data_root=str(options.data_root),
        directory=str(options.out / "distill"),
        teacher_path=teacher_name(options.dataset),
        teacher=None,
        device=str(options.device),
        workers=options.workers,
        json=None,
    )
    for key, value in (
        ("epochs", options.epochs),
        ("image_size", options.image_size),
        ("teacher_image_size", options.teacher_image_size),
    ):
        if value is not None:
            values[key] = value
    config = TrainConfig(**values)
    config.validate()
    return config


def _resume_settings(config: TrainConfig) -> TrainConfig:
    """Continue a distillation already in ``config.directory`` (refused if its settings differ)."""
    directory = Path(config.directory)
    saved_path = directory / RUN_CONFIG_NAME
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        ours = config.to_dict()
        differ = sorted(k for k in ours if k not in RUNTIME_KEYS and k in saved and saved[k] != ours[k])
        if differ:
            changes = ", ".join(f"{k}: {saved[k]!r} there, {ours[k]!r} now" for k in differ)
            raise FileExistsError(
                f"{directory} holds a distillation with other settings ({changes}). Nothing was changed. Use "
                "another --out, or delete that folder to start over."
            )
    finished = [p for p in directory.glob("model_*.pth.tar") if "interrupted" not in p.name]
    if finished:
        logger.info("Continuing the distillation in %s from its last finished epoch.", directory)
        return config.replace(resume_student="last")
    return config.replace(overwrite=True)  # nothing finished (at most an interrupted first epoch): start anew


# ------------------------------------------------------------------------------------------------ estimate
def estimate_duration(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    config: TrainConfig,
    config_epochs: int,
    train_images: int,
    test_images: int,
    device: torch.device,
) -> DurationEstimate:
    """A rough duration from timed forward passes (a probe on random tensors, a few batches).

    Counted: distillation ``epochs x min(query_size, train images) x views x (3 student forwards at QR + 1
    teacher forward at DR)`` (views = ``pos_num`` for ts_aug, 1 otherwise; a training step is assumed to
    cost :data:`TRAIN_STEP_FORWARDS` forwards), the monitoring tests every ``val_freq`` epochs, and the tests:
    the teacher's database at DR once, two students at QR. Not counted: image decoding and loading, which
    can dominate on a machine with few CPU cores, and downloads.
    """
    batch = max(1, min(8, config.batch_size))
    student_ms = latency_ms_per_image(student, config.image_size, device, batch_size=batch, repeats=2, warmup=1)
    teacher_ms = latency_ms_per_image(teacher, config.teacher_image_size, device, batch_size=batch, repeats=2, warmup=1)
    views = config.pos_num if issubclass(method_class(config.mode, config.loss), CoupledViewMethod) else 1
    per_epoch_ms = min(config.query_size, train_images) * views * (TRAIN_STEP_FORWARDS * student_ms + teacher_ms)
    tests_ms = test_images * (teacher_ms + 2 * student_ms)

    def total(epochs: int) -> float:
        monitor = (epochs // config.val_freq) * test_images * student_ms if config.val else 0.0
        return (epochs * per_epoch_ms + monitor + tests_ms) / 1000.0

    basis = (
        f"Basis: a timed probe on this device ({student_ms:.2f} ms per image for the student's forward pass at "
        f"{config.image_size} px, {teacher_ms:.2f} ms for the teacher's at {config.teacher_image_size} px, batches "
        f"of {batch}), a training step assumed to cost {TRAIN_STEP_FORWARDS:g} forward passes; image loading and "
        "decoding are not counted and can dominate on few CPU cores."
    )
    return DurationEstimate(
        student_ms, teacher_ms, config_epochs, config.epochs, total(config_epochs), total(config.epochs), basis
    )


# ------------------------------------------------------------------------------------------------ reports
def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def format_markdown(report: ReproduceReport) -> str:
    """``reproduce.md``: the table and how the run was made."""
    header = ["network", "query / database px"]
    for test in ("asym", "sym"):
        for metric in METRICS:
            header += [f"{test} {metric}", "paper", "diff"]
    lines = [
        f"# raml reproduce {report.dataset}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in report.rows:
        diff = row.difference()
        sizes = f"{row.query_size} / {row.database_size}" if row.database_size else f"{row.query_size}"
        cells = [f"{row.network} (`{row.checkpoint}`)", sizes]
        for test in ("asym", "sym"):
            for metric in METRICS:
                value = row.results.get(test, {}).get(metric)
                paper = (row.paper or {}).get(test, {}).get(metric)
                cells += [_cell(value), _cell(paper), _signed(diff.get(test, {}).get(metric))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "mAP and R@1 in %, every test image a query against all the others. The paper's numbers are the "
        f"authors' published results for {PAPER_ARXIV} (the table of their code's README, {PAPER_SOURCE_URL}; "
        "also in raml's README), those of the distilled student; that table has no row for the teacher.",
        "",
        f"- status: {report.status}",
        f"- device: {report.device}",
        f"- wall time of this run: {_duration(report.wall_time_s)}, started {report.started}",
        f"- distillation config: {report.config}, {report.epochs} epochs",
    ]
    start = report.distill_start_epoch
    if start is not None and start > report.epochs:
        lines.append("- the distillation had been finished by an earlier run (its time is not counted here)")
    elif start is not None and start > 1:
        lines.append(
            f"- the distillation continued from epoch {start}: an earlier, interrupted run trained epochs 1 to "
            f"{start - 1} (its time is not counted here)"
        )
    if report.shortened:
        lines.append(
            f"- **shortened**: --epochs {report.epochs} instead of the config's {report.config_epochs}: a smoke "
            "run, not the paper's setting; the distilled student's numbers are not comparable to the paper's."
        )
    if report.estimate is not None:
        lines.append(f"- estimate given before the run: {report.estimate.describe()}")
    return "\n".join(lines) + "\n"


def write_reports(report: ReproduceReport, out: Path) -> None:
    atomic_write_text(out / "reproduce.json", json.dumps(report.to_json(), indent=2) + "\n")
    atomic_write_text(out / "reproduce.md", format_markdown(report))


def _short(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {test: {m: float(metrics[m]) for m in METRICS} for test, metrics in results.items()}


# ------------------------------------------------------------------------------------------------ the run
def run_reproduction(
    options: ReproduceOptions,
    notify: Callable[[str], None] = logger.info,
) -> ReproduceReport:
    """Test the published teacher and student, distil a student, test it; write the reports (module docstring).

    Args:
        options: What to run.
        notify: Receives the messages meant for the user (the estimate, each step's results).

    Returns:
        The report (also written to ``<out>/reproduce.json`` and ``.md``).

    Raises:
        DatasetNotFoundError: The dataset is not in ``data_root`` (the message says how to download it).
        FileExistsError: ``<out>/distill`` holds a distillation with other settings.
    """
    if options.dataset not in PAPER_RESULTS:
        raise ValueError(f"Unknown dataset {options.dataset!r}; the paper's table has {', '.join(PAPER_RESULTS)}.")
    start = time.perf_counter()
    device = options.device
    paper = PAPER_RESULTS[options.dataset].metrics()
    config_epochs = int(load_yaml_config(options.config).get("epochs", TrainConfig().epochs))
    config = _resume_settings(distillation_config(options))
    # a missing dataset fails now (the message says how to download it), not after the networks are fetched
    test_split = get_split(f"{options.dataset}-test", options.data_root)
    train_images = len(get_split(f"{options.dataset}-trainval", options.data_root, config.val_ratio))
    options.out.mkdir(parents=True, exist_ok=True)
    report = ReproduceReport(
        dataset=options.dataset,
        device=describe_device(device),
        config=str(options.config),
        epochs=config.epochs,
        config_epochs=config_epochs,
        image_size=config.image_size,
        teacher_image_size=config.teacher_image_size,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    qr, dr = config.image_size, config.teacher_image_size

    teacher = load_network(teacher_name(options.dataset), data_root=options.data_root, device=device)
    teacher_sha = file_sha256(teacher.source_path)
    published = load_network(student_name(options.dataset), data_root=options.data_root, device=device)
    probe_student = (
        build_network(config.student, pooling=config.pool, whitening=config.whitening, pretrained=False).to(device)
        if config.student is not None
        else published
    )
    report.estimate = estimate_duration(
        probe_student, teacher, config, config_epochs, train_images, len(test_split), device
    )
    del probe_student
    notify(report.estimate.describe())
    write_reports(report, options.out)

    def finish_row(row: NetworkRow) -> None:
        report.rows.append(row)
        report.wall_time_s = time.perf_counter() - start
        write_reports(report, options.out)
        notify(
            f"{row.network}: "
            + "; ".join(f"{t} mAP {m['mAP']:.2f}, R@1 {m['R@1']:.2f}" for t, m in row.results.items())
        )

    # 1. the teacher, symmetric at DR: its embeddings are the database of every asymmetric test (cached)
    cache = EmbeddingCache(options.data_root / "cache" / "embeddings")
    database = cache.get_or_compute(
        teacher_sha,
        dr,
        test_split.name,
        list(test_split.paths),
        lambda: extract_embeddings(
            teacher,
            [str(p) for p in test_split.abspaths()],
            dr,
            device,
            options.batch_size,
            options.workers,
            options.progress,
            f"{test_split.name} teacher@{dr}",
        ),
        network_meta=teacher.meta,
        root=test_split.root,
    )
    labels = torch.as_tensor(test_split.labels)
    sym = retrieval_metrics(database, database, labels, labels, ks=default_ks(test_split.name), exclude_self=True)
    finish_row(NetworkRow("published teacher", teacher_name(options.dataset), dr, None, _short({"sym": sym}), None))

    # 2. the published student, asymmetric against the teacher's database, and symmetric
    def test_student(network: torch.nn.Module) -> dict[str, dict[str, float]]:
        return evaluate_split(
            network,
            test_split,
            qr,
            device,
            teacher=teacher,
            teacher_image_size=dr,
            sym=True,
            batch_size=options.batch_size,
            workers=options.workers,
            cache=cache,
            teacher_sha256=teacher_sha,
            progress=options.progress,
        )

    finish_row(
        NetworkRow("published student", student_name(options.dataset), qr, dr, _short(test_student(published)), paper)
    )
    del published

    # 3. distil (continuing an interrupted run), 4. test the result
    trainer = Trainer(config, device, progress=options.progress, teacher_device=device, resume_hint=RESUME_HINT)
    report.distill_start_epoch = trainer.start_epoch
    result = trainer.run()
    del trainer
    distilled = load_network(result.best_checkpoint, device=device)
    checkpoint = str(result.best_checkpoint)
    finish_row(
        NetworkRow(
            f"distilled student ({config.epochs} epochs)", checkpoint, qr, dr, _short(test_student(distilled)), paper
        )
    )
    report.status = "complete"
    report.wall_time_s = time.perf_counter() - start
    write_reports(report, options.out)
    return report
