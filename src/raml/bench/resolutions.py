"""``raml bench resolutions``: one student for several query sizes against a dedicated student per size.

On the demo's synthetic data (``raml.demo``: the same dataset and the same teacher, trained once and cached
under ``--out``), for each of ``--seeds`` seeds:

- a dedicated student per size S of ``--sizes``: ``ts_aug`` distillation at S alone, ``--epochs`` epochs;
- one multi-resolution student: the same method, one size drawn per batch from the list
  (``--image-size 24,32,48``), ``len(sizes) * --epochs`` epochs: the same total number of student images
  as the dedicated students together (the same total training budget);
- unless ``--no-same-steps``, a second dedicated student per size (``dedicated-same-steps``) trained for
  ``len(sizes) * --epochs`` epochs: as many optimizer steps as the multi-resolution student, so the
  comparison is made against both controls (the same total budget, and the same steps per student).

Every student is tested asymmetrically (queries at S against the teacher's database at DR, embedded once) on
the held-out classes; the multi-resolution student at every size, each dedicated student at its own. The
paired gaps (same seed) are given against each control. With
``--per-size-bn`` the multi-resolution student is also tested with per-size BatchNorm statistics estimated
on the training images (``raml.models.switchable_bn``), reported apart (``per_size_bn`` rows).

Outputs in ``--out``: ``resolutions.json`` (``rows``: one per student, seed and query size with ``student``
in {``multi``, ``dedicated``, ``dedicated-same-steps``}, ``seed``, ``query_size``, ``asym_mAP``,
``asym_R@1``, ``sym_mAP``, ``query_gflops``; ``summary``: mean and standard deviation over the seeds;
``gaps``: paired differences against each control; ``settings``; ``stack``; ``seconds``),
``resolutions.md`` (the table) and ``resolutions.png`` (mAP against query GFLOPs, one curve per student).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from raml.bench import parsers
from raml.data.sizes import parse_image_sizes
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
from raml.engine.config import RUN_CONFIG_NAME, part_name
from raml.engine.trainer import Trainer
from raml.models import load_network
from raml.retrieval.size_bn import recalibrate_size_bn
from raml.retrieval.sizes import DatabaseOnce, evaluate_sizes
from raml.utils import atomic_path, atomic_write_text, seed_everything

logger = logging.getLogger(__name__)

__all__ = [
    "ResolutionSettings",
    "main",
    "resolutions_markdown",
    "resolutions_tables",
    "run_resolutions_benchmark",
    "summarise",
]

STUDENTS = ("multi", "dedicated", "dedicated-same-steps")
#: the controls the multi-resolution student is compared with: the same total budget, the same steps
CONTROLS = ("dedicated", "dedicated-same-steps")
KS = (1, 4)


@dataclass
class ResolutionSettings:
    """What the benchmark runs. ``demo`` holds the data, teacher and distillation settings (the demo's)."""

    out: Path = Path("bench-resolutions")
    sizes: list[int] = field(default_factory=lambda: [24, 32, 48])
    seeds: int = 3
    #: epochs of each dedicated student; the multi-resolution student gets ``len(sizes)`` times as many
    epochs: int = 4
    per_size_bn: bool = True
    #: also train a dedicated student per size for ``len(sizes) * epochs`` epochs (the multi student's steps)
    same_steps: bool = True
    demo: DemoSettings = field(default_factory=DemoSettings)


def quick_settings(out: Path) -> ResolutionSettings:
    """A tiny run (seconds): few classes and images, a tiny backbone, one epoch; for tests."""
    demo = DemoSettings(
        out=out,
        num_classes=6,
        images_per_class=4,
        image_size=32,
        architecture="test_resnet",
        whitening=16,
        teacher_size=32,
        teacher_epochs=1,
        student_epochs=1,
        pos_num=2,
        threads=1,
    )
    return ResolutionSettings(out=out, sizes=[16, 24], seeds=1, epochs=1, demo=demo)


def _teacher(settings: ResolutionSettings, data_root: Path, device: torch.device, progress: bool) -> Path:
    """The demo's teacher, trained once: reused while the data and teacher settings are the same."""
    demo = settings.demo
    stamp = settings.out / "teacher" / "raml_bench_teacher.json"
    wanted = {
        key: value
        for key, value in asdict(demo).items()
        if key not in ("out", "student_size", "student_epochs", "student_lr", "pos_num", "lam_1", "lam_2", "threads")
    }
    wanted = json.loads(json.dumps(wanted, default=str))
    checkpoint = settings.out / "teacher" / "model_best.pth.tar"
    if checkpoint.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        logger.info("Reusing the teacher %s", checkpoint)
        return checkpoint
    seed_everything(demo.seed)
    path = train_teacher(demo, data_root, device, progress)
    atomic_write_text(stamp, json.dumps(wanted))
    return path


def train_student(
    settings: ResolutionSettings,
    data_root: Path,
    teacher: Path,
    sizes: Sequence[int],
    epochs: int,
    seed: int,
    directory: Path,
    device: torch.device,
    progress: bool,
) -> Path:
    """The demo's distillation (``ts_aug``, initialised from the teacher) at ``sizes`` (one per batch)."""
    demo = settings.demo
    config = train_config(
        demo,
        data_root,
        directory,
        mode="ts_aug",
        student_path=str(teacher),
        teacher_path=str(teacher),
        image_size=sizes[0],
        image_sizes=list(sizes) if len(sizes) > 1 else None,
        teacher_image_size=demo.teacher_size,
        epochs=epochs,
        lr=demo.student_lr,
        lam_1=demo.lam_1,
        lam_2=demo.lam_2,
        pos_num=demo.pos_num,
        batch_size=8,
        update_every=1,
        freeze_bn=True,
        seed=seed,
    )
    best, written = directory / "model_best.pth.tar", directory / RUN_CONFIG_NAME
    # a student finished by an earlier (interrupted) run of the same settings is reused: model_best is
    # written after the last epoch only, and config.yaml holds the run's settings
    if best.is_file() and written.is_file() and yaml.safe_load(written.read_text()) == config.record():
        logger.info("Reusing the finished student %s", best)
        return best
    seed_everything(seed)
    return Trainer(config, device, progress=progress).run().best_checkpoint


def _rows(student: str, seed: int, entries: list[dict[str, Any]], split_name: str) -> list[dict[str, Any]]:
    rows = []
    for entry in entries:
        metrics = entry["results"][split_name]
        rows.append(
            {
                "student": student,
                "seed": seed,
                "query_size": entry["image_size"],
                "asym_mAP": round(metrics["asym"]["mAP"], 2),
                "asym_R@1": round(metrics["asym"]["R@1"], 2),
                "sym_mAP": round(metrics["sym"]["mAP"], 2),
                "query_gflops": round(entry["query_gflops"], 4),
            }
        )
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) standard deviation over seeds per (student, query size), in the rows' order."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["student"], row["query_size"]), []).append(row)
    summary = []
    for (student, size), members in groups.items():
        entry: dict[str, Any] = {"student": student, "query_size": size, "seeds": len(members)}
        for key in ("asym_mAP", "asym_R@1", "sym_mAP"):
            values = [m[key] for m in members]
            entry[f"{key}_mean"] = round(statistics.fmean(values), 2)
            entry[f"{key}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
        entry["query_gflops"] = members[0]["query_gflops"]
        summary.append(entry)
    return summary


def gaps(rows: list[dict[str, Any]], other: str = "multi", control: str = "dedicated") -> list[dict[str, Any]]:
    """Per size: ``other`` minus ``control`` asym mAP, per seed (paired) and its mean and spread."""
    by_key = {(r["student"], r["seed"], r["query_size"]): r for r in rows}
    sizes = sorted({r["query_size"] for r in rows if r["student"] == control})
    result = []
    for size in sizes:
        diffs = [
            by_key[(other, seed, size)]["asym_mAP"] - by_key[(control, seed, size)]["asym_mAP"]
            for (student, seed, s) in by_key
            if student == control and s == size and (other, seed, size) in by_key
        ]
        if diffs:
            result.append(
                {
                    "query_size": size,
                    "student": other,
                    "control": control,
                    "gap_mean": round(statistics.fmean(diffs), 2),
                    "gap_std": round(statistics.stdev(diffs), 2) if len(diffs) > 1 else 0.0,
                    "gap_per_seed": [round(d, 2) for d in diffs],
                }
            )
    return result


def resolutions_markdown(results: dict[str, Any]) -> str:
    """``resolutions.md``: the mean ± std table, the paired gaps and the settings."""
    s = results["settings"]
    lines = [
        "# One student for several query sizes",
        "",
        f"Asymmetric retrieval on the held-out synthetic classes: queries at each size against the teacher's "
        f"{s['demo']['teacher_size']} px database; mean ± standard deviation over "
        + (
            f"{s['seeds']} seed(s)."
            if s.get("complete", True)
            else f"{s['seeds_done']} of {s['seeds']} seeds: INCOMPLETE, the run stopped (or is still running) after "
            f"seed {s['seed_values'][-1] if s['seed_values'] else '-'}."
        ),
        "",
        resolutions_tables(results),
    ]
    d = s["demo"]
    lines += [
        "",
        f"Settings: {d['architecture']}, {d['num_classes']} classes x {d['images_per_class']} images, DR "
        f"{d['teacher_size']} px, teacher {d['teacher_epochs']} epochs (trained once); sizes {s['sizes']}; "
        f"dedicated students {s['epochs']} epochs each, the multi-size student {s['epochs'] * len(s['sizes'])} "
        f"epochs (the same number of student images)"
        + (
            f", the dedicated-same-steps students {s['epochs'] * len(s['sizes'])} epochs each (the multi-size "
            "student's optimizer steps)"
            if s.get("same_steps")
            else ""
        )
        + f"; seeds {s['seed_values']}; total "
        f"{results['seconds'] / 60:.1f} min on {results['stack']['torch_threads']} torch threads "
        f"({results['stack'].get('gpu') or results['stack']['cpu']}).",
        "",
    ]
    return "\n".join(lines)


def resolutions_tables(results: dict[str, Any]) -> str:
    """The two Markdown tables of ``resolutions.md`` (docs/resolutions.md shows them for its run)."""
    lines = [
        "| student | query size | asym mAP | asym R@1 | sym mAP | query GFLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for e in sorted(results["summary"], key=lambda e: (e["query_size"], e["student"])):
        lines.append(
            f"| {e['student']} | {e['query_size']} px | {e['asym_mAP_mean']:.2f} ± {e['asym_mAP_std']:.2f} | "
            f"{e['asym_R@1_mean']:.2f} ± {e['asym_R@1_std']:.2f} | {e['sym_mAP_mean']:.2f} ± {e['sym_mAP_std']:.2f} "
            f"| {e['query_gflops']:.4f} |"
        )
    lines += ["", "Paired difference to each control (same seed), asym mAP:", ""]
    lines += ["| student | against | query size | mean | std | per seed |", "|---|---|---|---|---|---|"]
    for g in results["gaps"]:
        per_seed = ", ".join(f"{d:+.2f}" for d in g["gap_per_seed"])
        lines.append(
            f"| {g['student']} | {g.get('control', 'dedicated')} | {g['query_size']} px | {g['gap_mean']:+.2f} | "
            f"{g['gap_std']:.2f} | {per_seed} |"
        )
    return "\n".join(lines)


def plot_resolutions(summary: list[dict[str, Any]], path: Path) -> None:
    """asym mAP against query GFLOPs: one curve per student kind (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    styles = {"multi": ("*-", "one student, all sizes"), "dedicated": ("o--", "a dedicated student per size")}
    styles["dedicated-same-steps"] = ("d-.", "a dedicated student per size, the multi student's steps")
    styles["multi+per-size-bn"] = ("s:", "one student, per-size BN statistics")
    labelled: set[int] = set()
    for student, (style, label) in styles.items():
        points = sorted((e for e in summary if e["student"] == student), key=lambda e: e["query_gflops"])
        if not points:
            continue
        ax.errorbar(
            [e["query_gflops"] for e in points],
            [e["asym_mAP_mean"] for e in points],
            yerr=[e["asym_mAP_std"] for e in points],
            fmt=style,
            capsize=3,
            label=label,
        )
        for e in points:
            if e["query_size"] in labelled:  # one label per size: the curves share their x positions
                continue
            labelled.add(e["query_size"])
            ax.annotate(
                f"{e['query_size']} px",
                (e["query_gflops"], e["asym_mAP_mean"]),
                xytext=(5, -12),
                textcoords="offset points",
                fontsize=8,
            )
    ax.set_xlabel("query cost (GFLOPs per image)")
    ax.set_ylabel("asymmetric mAP (%)")
    ax.set_title("One student for several query sizes vs one per size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run_resolutions_benchmark(
    settings: ResolutionSettings, device: torch.device, progress: bool = True
) -> dict[str, Any]:
    """Run the comparison; writes ``resolutions.json``, ``.md`` and ``.png`` into ``settings.out``."""
    sizes = parse_image_sizes(settings.sizes)
    if len(sizes) < 2:
        raise ValueError(f"--sizes needs at least two sizes to compare one student with several, got {sizes}.")
    if max(sizes) > settings.demo.teacher_size:
        raise ValueError(f"--sizes {sizes} must not exceed the teacher's size {settings.demo.teacher_size}.")
    if settings.seeds < 1 or settings.epochs < 1:
        raise ValueError(f"--seeds and --epochs must be at least 1, got {settings.seeds} and {settings.epochs}.")
    start = time.perf_counter()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    demo = replace(settings.demo, out=out)
    settings = replace(settings, demo=demo)
    data_root = out / "data"
    seeds = [demo.seed + i for i in range(settings.seeds)]
    rows: list[dict[str, Any]] = []
    bn_rows: list[dict[str, Any]] = []
    with reproducible(demo.threads):
        generate_dataset(demo, data_root)
        teacher_path = _teacher(settings, data_root, device, progress)
        split = get_split(f"{DATASET}-test", data_root)
        train_paths = [str(p) for p in get_split(part_name(DATASET, "trainval"), data_root).abspaths()]
        teacher = load_network(teacher_path, device=device)
        database = DatabaseOnce(teacher)

        def test(path: Path, at: Sequence[int], recalibrate: bool = False) -> list[dict[str, Any]]:
            network = load_network(path, device=device)
            if recalibrate:
                recalibrate_size_bn(network, train_paths, at, device, progress=progress)
            return evaluate_sizes(
                network,
                [split],
                at,
                device,
                teacher=teacher,
                teacher_image_size=demo.teacher_size,
                sym=True,
                ks=KS,
                progress=progress,
                embed=database,
            )

        results: dict[str, Any] = {}
        for seed in seeds:
            for size in sizes:
                logger.info("seed %d: dedicated student at %d px, %d epochs", seed, size, settings.epochs)
                path = train_student(
                    settings,
                    data_root,
                    teacher_path,
                    [size],
                    settings.epochs,
                    seed,
                    out / "students" / f"seed{seed}" / f"dedicated{size}",
                    device,
                    progress,
                )
                rows += _rows("dedicated", seed, test(path, [size]), split.name)
            epochs = settings.epochs * len(sizes)
            for size in sizes if settings.same_steps else []:
                logger.info("seed %d: dedicated student at %d px, %d epochs (same steps)", seed, size, epochs)
                path = train_student(
                    settings,
                    data_root,
                    teacher_path,
                    [size],
                    epochs,
                    seed,
                    out / "students" / f"seed{seed}" / f"dedicated{size}-same-steps",
                    device,
                    progress,
                )
                rows += _rows("dedicated-same-steps", seed, test(path, [size]), split.name)
            logger.info("seed %d: one student for %s, %d epochs", seed, sizes, epochs)
            path = train_student(
                settings,
                data_root,
                teacher_path,
                sizes,
                epochs,
                seed,
                out / "students" / f"seed{seed}" / "multi",
                device,
                progress,
            )
            rows += _rows("multi", seed, test(path, sizes), split.name)
            if settings.per_size_bn:
                bn_rows += _rows("multi+per-size-bn", seed, test(path, sizes, recalibrate=True), split.name)
            # the outputs so far after every seed: an interrupted run keeps its finished seeds
            done = seeds[: seeds.index(seed) + 1]
            results = _write_results(out, settings, done, rows, bn_rows, software_stack(device), start)
    return results


def _write_results(
    out: Path,
    settings: ResolutionSettings,
    seeds: list[int],
    rows: list[dict[str, Any]],
    bn_rows: list[dict[str, Any]],
    stack: dict[str, Any],
    start: float,
) -> dict[str, Any]:
    """Write resolutions.json, .md and .png for the ``seeds`` finished so far; ``settings.seeds`` (the number
    requested) is kept, with ``seeds_done`` and ``complete`` (False until the last seed is in)."""
    settings_dict = json.loads(json.dumps(asdict(settings), default=str))
    settings_dict["seed_values"], settings_dict["seeds_done"] = seeds, len(seeds)
    settings_dict["complete"] = len(seeds) >= settings.seeds
    summary = summarise(rows + bn_rows)
    results = {
        "rows": rows,
        "summary": summary,
        "gaps": [
            gap
            for control in CONTROLS
            for other in ("multi", "multi+per-size-bn")
            for gap in gaps(rows + bn_rows, other, control)
        ],
        "per_size_bn": bn_rows,
        "settings": settings_dict,
        "stack": stack,
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_text(out / "resolutions.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "resolutions.md", resolutions_markdown(results))
    plot_resolutions(summary, out / "resolutions.png")
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``raml bench resolutions [--quick] [--out DIR] [--seeds N] [--epochs E] [--sizes 24,32,48]``."""
    from raml.entry import setup_logging
    from raml.utils import select_device

    d = ResolutionSettings()
    parser = parsers.resolutions_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    settings = quick_settings(args.out) if args.quick else replace(d, out=args.out, demo=replace(d.demo, out=args.out))
    if args.seeds is not None:
        settings.seeds = args.seeds
    if args.epochs is not None:
        settings.epochs = args.epochs
    if args.sizes is not None:
        settings.sizes = args.sizes if isinstance(args.sizes, list) else [args.sizes]
    settings.per_size_bn = not args.no_per_size_bn
    settings.same_steps = not args.no_same_steps
    if args.threads is not None:
        settings.demo = replace(settings.demo, threads=args.threads)
    try:
        results = run_resolutions_benchmark(settings, select_device(args.device), progress=not args.no_progress)
    except ValueError as error:
        raise SystemExit(f"raml bench resolutions: error: {error}") from error
    print(resolutions_markdown(results))
    return 0
