"""``raml bench methods``: every distillation method and ablation side by side, on the demo's data and teacher.

On the demo's synthetic dataset (:mod:`raml.demo`: its :class:`~raml.demo.DemoSettings`, its teacher training
:func:`~raml.demo.train_teacher`), the teacher is trained once at DR with labels and cached in the output folder
(reused while the settings that made it are unchanged). Then each row of :data:`ROWS` distils a student at QR
from it without labels, with the same budget (epochs, every training image every epoch, 8 images per batch,
``pos_num`` views, learning rate, schedule), once per seed; the student starts from the teacher's weights as in
the demo. The shared learning rate (3e-4) and ``ts_aug``'s lambdas (0.7, 0.7) are the demo's student settings
(:class:`~raml.demo.DemoSettings`), not tuned per method; every other method runs with its loss's defaults
(:mod:`raml.losses`). The relational methods (``aml``, ``rkd``, ``csd``, ``d3``, ``rop``) all leave the
other views of a row's image out of its relations. ``ugd`` is the one distiller that reads the training labels
(its unambiguous regions, :mod:`raml.engine.methods.ugd`). Each student is tested on the held-out classes:
asymmetric (student at QR against the teacher's DR database: mAP, R@1) and symmetric (student at QR on both
sides: mAP). The first row is the undistilled baseline, the teacher's own QR queries against its DR database
(trained once: no spread over seeds).

Outputs in ``--out``: ``methods.json`` (a list of rows: ``method``, ``asym_mAP``, ``asym_R@1``, ``sym_mAP``,
``train_seconds`` as means over the seeds, each with a ``*_std`` companion (sample standard deviation, 0 for
a single seed), ``seeds`` and the per-seed ``runs``), ``methods.md`` (the table as mean ± std, the settings and
the software stack) and ``methods.png`` (the accuracies with their spread, and the training time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from raml.bench import parsers
from raml.data.splits import get_split
from raml.demo import (
    DATASET,
    DemoSettings,
    generate_dataset,
    reproducible,
    software_stack,
    train_config,
    train_teacher,
)
from raml.engine.config import TrainConfig
from raml.engine.trainer import Trainer
from raml.models import load_network
from raml.retrieval.evaluate import evaluate_split
from raml.utils import atomic_path, atomic_write_text, seed_everything, select_device

logger = logging.getLogger(__name__)

__all__ = ["ROWS", "MethodsBenchSettings", "main", "methods_markdown", "run_directory", "run_methods_benchmark"]

BASELINE = "no distillation (teacher at QR)"
#: the distillation rows: name -> the training settings that differ from the shared budget
ROWS: dict[str, dict[str, Any]] = {
    "ts_aug": {"mode": "ts_aug"},
    "ts_aug --no-mixup": {"mode": "ts_aug", "mixup": False},
    "ts_aug --uncoupled-views": {"mode": "ts_aug", "uncoupled_views": True},
    "ts_reg": {"mode": "ts_reg"},
    "aml": {"mode": "aml"},
    "rkd": {"mode": "rkd"},
    "csd": {"mode": "csd"},
    "d3": {"mode": "d3"},
    "rop": {"mode": "rop"},
    "ugd": {"mode": "ugd"},
}
METRICS = ("asym_mAP", "asym_R@1", "sym_mAP", "train_seconds")
#: the demo settings that make the teacher (a cached teacher is reused while they are unchanged)
TEACHER_FIELDS = ("num_classes", "images_per_class", "image_size", "pattern_period", "architecture", "whitening",
                  "teacher_size", "teacher_epochs", "teacher_lr", "teacher_batch_size", "seed", "threads")  # fmt: skip


@dataclass
class MethodsBenchSettings:
    """The comparison's budget. ``demo`` holds the data, teacher and sizes (the demo's defaults)."""

    out: Path = Path("bench-methods")
    seeds: int = 3
    epochs: int = 5
    demo: DemoSettings = field(default_factory=DemoSettings)
    rows: tuple[str, ...] = tuple(ROWS)

    @classmethod
    def quick(cls, out: Path) -> MethodsBenchSettings:
        """A few minutes on 2 CPU cores: a smaller dataset and teacher, one seed, one epoch."""
        demo = DemoSettings(out=out, num_classes=20, images_per_class=8, teacher_epochs=6)
        return cls(out=out, seeds=1, epochs=1, demo=demo)


def _check_settings(settings: MethodsBenchSettings) -> None:
    unknown = [name for name in settings.rows if name not in ROWS]
    if unknown:
        raise ValueError(f"Unknown method rows {unknown}; valid: {', '.join(ROWS)}.")
    if settings.seeds < 1 or settings.epochs < 1:
        raise ValueError(f"--seeds and --epochs must be at least 1, got {settings.seeds} and {settings.epochs}.")
    if settings.out.exists() and not settings.out.is_dir():
        raise ValueError(f"--out {settings.out} is a file; give a folder (it is created if missing).")


def _teacher(demo: DemoSettings, data_root: Path, device: torch.device, progress: bool) -> Path:
    """Train the teacher once; reuse it while the settings that made it are the same."""
    stamp = demo.out / "teacher.json"
    wanted = {k: v for k, v in asdict(demo).items() if k in TEACHER_FIELDS}
    wanted["pattern_period"] = list(demo.pattern_period)
    checkpoint = demo.out / "teacher" / "model_best.pth.tar"
    if checkpoint.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        logger.info("Reusing the teacher %s", checkpoint)
        return checkpoint
    seed_everything(demo.seed)
    checkpoint = train_teacher(demo, data_root, device, progress)
    atomic_write_text(stamp, json.dumps(wanted, indent=2))
    return checkpoint


def run_directory(out: Path, name: str, seed: int) -> Path:
    """Where row ``name``'s student of ``seed`` is trained (its ``config.yaml`` and ``model_best.pth.tar``)."""
    return out / "runs" / name.replace(" --", "_").replace("-", "_") / f"seed{seed}"


def _student_config(
    settings: MethodsBenchSettings, data_root: Path, teacher: Path, directory: Path, seed: int, **values: Any
) -> TrainConfig:
    """The shared budget (the demo's student stage, ``settings.epochs`` epochs) plus the row's own settings."""
    demo = settings.demo
    config = train_config(
        demo,
        data_root,
        directory,
        **{
            "student_path": str(teacher),
            "teacher_path": str(teacher),
            "freeze_bn": True,
            "image_size": demo.student_size,
            "teacher_image_size": demo.teacher_size,
            "epochs": settings.epochs,
            "lr": demo.student_lr,
            "lam_1": demo.lam_1,
            "lam_2": demo.lam_2,
            "pos_num": demo.pos_num,
            "batch_size": 8,
            "update_every": 1,
            "seed": seed,
            **values,
        },
    )
    # the demo's lambdas and --pos-num are the budget of the rows that read them: the others keep the defaults (no
    # "does not use --lam-1" warning for a setting the row never asked for)
    shared = {"lam_1", "lam_2", "pos_num"} - set(values)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return config.replace(**{name: defaults[name] for name in config.ignored_settings() if name in shared})


def _evaluate(network: torch.nn.Module, teacher: torch.nn.Module, demo: DemoSettings, data_root: Path,
              device: torch.device) -> dict[str, float]:  # fmt: skip
    split = get_split(f"{DATASET}-test", data_root)
    results = evaluate_split(
        network,
        split,
        demo.student_size,
        device,
        teacher=teacher,
        teacher_image_size=demo.teacher_size,
        sym=True,
        ks=(1,),
        progress=False,
    )
    return {
        "asym_mAP": round(results["asym"]["mAP"], 2),
        "asym_R@1": round(results["asym"]["R@1"], 2),
        "sym_mAP": round(results["sym"]["mAP"], 2),
    }


def _summarise(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method}
    for key in METRICS:
        values = [run[key] for run in runs]
        row[key] = round(statistics.fmean(values), 2)
        row[f"{key}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
    row["seeds"] = len(runs)
    row["runs"] = runs
    return row


def run_methods_benchmark(
    settings: MethodsBenchSettings, device: torch.device, progress: bool = True
) -> list[dict[str, Any]]:
    """Train and test every row for every seed; write ``methods.json``, ``methods.md`` and ``methods.png``."""
    _check_settings(settings)
    start = time.perf_counter()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    demo = replace(settings.demo, out=out)
    data_root = out / "data"
    rows: list[dict[str, Any]] = []
    with reproducible(demo.threads):
        generate_dataset(demo, data_root, progress=False)
        teacher_path = _teacher(demo, data_root, device, progress)
        teacher = load_network(teacher_path, device=device)
        seed_everything(demo.seed)
        baseline = {**_evaluate(teacher, teacher, demo, data_root, device), "train_seconds": 0.0, "seed": demo.seed}
        rows.append(_summarise(BASELINE, [baseline]))
        for name in settings.rows:
            runs = []
            for seed in range(demo.seed, demo.seed + settings.seeds):
                logger.info("%s, seed %d", name, seed)
                directory = run_directory(out, name, seed)
                config = _student_config(settings, data_root, teacher_path, directory, seed, **ROWS[name])
                seed_everything(seed)
                began = time.perf_counter()
                student_path = Trainer(config, device, progress=progress).run().best_checkpoint
                seconds = round(time.perf_counter() - began, 1)
                student = load_network(student_path, device=device)
                runs.append({**_evaluate(student, teacher, demo, data_root, device), "train_seconds": seconds,
                             "seed": seed})  # fmt: skip
            rows.append(_summarise(name, runs))
        stack = software_stack(device)
    seconds = time.perf_counter() - start
    atomic_write_text(out / "methods.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "methods.md", methods_markdown(rows, settings, seconds, stack))
    plot_methods(rows, out / "methods.png")
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    if row["seeds"] == 1:
        return f"{row[key]:.2f}"
    return f"{row[key]:.2f} ± {row[f'{key}_std']:.2f}"


def methods_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the rows: mean ± standard deviation over the seeds."""
    lines = [
        "| method | asym mAP | asym R@1 | sym mAP | training s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        seconds = "–" if row["method"] == BASELINE else _cell(row, "train_seconds")
        lines.append(
            f"| {row['method']} | {_cell(row, 'asym_mAP')} | {_cell(row, 'asym_R@1')} | {_cell(row, 'sym_mAP')} | "
            f"{seconds} |"
        )
    return "\n".join(lines)


def methods_markdown(
    rows: list[dict[str, Any]], settings: MethodsBenchSettings, seconds: float, stack: dict[str, Any]
) -> str:
    """``methods.md``: title, table, then the settings and the software stack."""
    demo = settings.demo
    return (
        "# raml bench methods\n\n"
        + methods_table(rows)
        + "\n\n"
        + f"Synthetic data: {demo.num_classes} classes x {demo.images_per_class} images (half for training, half "
        f"for testing); {demo.architecture} teacher trained from random weights at DR {demo.teacher_size} px for "
        f"{demo.teacher_epochs} epochs (once, seed {demo.seed}); each student starts from the teacher and is "
        f"distilled at QR {demo.student_size} px for {settings.epochs} epochs (every training image each epoch, "
        f"8 images x {demo.pos_num} views per batch, lr {demo.student_lr}), seeds {demo.seed}.."
        f"{demo.seed + settings.seeds - 1}; mean ± sample standard deviation over the seeds. Total "
        f"{seconds / 60:.1f} min.\n\n"
        + f"Stack: torch {stack.get('torch')}, {stack['torch_threads']} torch threads, device {stack['device']} "
        f"({stack.get('gpu') or stack['cpu']}).\n"
    )


def plot_methods(rows: list[dict[str, Any]], path: Path) -> None:
    """Asymmetric and symmetric mAP (with their spread over the seeds) and training seconds, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["method"] for row in rows]
    positions = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True)
    height = 0.38
    for offset, key, label in ((-height / 2, "asym_mAP", "asymmetric mAP"), (height / 2, "sym_mAP", "symmetric mAP")):
        left.barh(
            [p + offset for p in positions],
            [row[key] for row in rows],
            height=height,
            xerr=[row[f"{key}_std"] for row in rows],
            label=label,
        )
    left.set_yticks(positions, names)
    left.invert_yaxis()
    left.set_xlabel("mAP (%) on the test classes")
    left.legend(fontsize=8, loc="lower right")
    left.grid(True, axis="x", alpha=0.3)
    right.barh(positions, [row["train_seconds"] for row in rows], xerr=[row["train_seconds_std"] for row in rows])
    right.set_xlabel("training seconds")
    right.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Distillation methods on the synthetic data (mean ± std over seeds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``raml bench methods [--out DIR] [--quick] [--seeds N] [--epochs N]``."""
    from raml.entry import setup_logging

    parser = parsers.methods_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    settings = MethodsBenchSettings.quick(args.out) if args.quick else MethodsBenchSettings(out=args.out)
    demo_changes = {
        "teacher_epochs": args.teacher_epochs,
        "num_classes": args.classes,
        "images_per_class": args.images_per_class,
        "architecture": args.architecture,
        "threads": args.threads,
        "pos_num": args.pos_num,
    }
    demo = replace(settings.demo, **{k: v for k, v in demo_changes.items() if v is not None})
    changes = {"seeds": args.seeds, "epochs": args.epochs, "rows": args.methods}
    settings = replace(settings, demo=demo, **{k: v for k, v in changes.items() if v is not None})
    try:
        _check_settings(settings)
    except ValueError as error:
        raise SystemExit(f"raml bench methods: error: {error}") from None
    rows = run_methods_benchmark(settings, select_device(args.device), progress=not args.no_progress)
    print(methods_table(rows))
    print(f"Wrote {settings.out / 'methods.json'}, methods.md and methods.png")
    return 0
