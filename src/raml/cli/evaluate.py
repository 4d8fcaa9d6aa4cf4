"""``raml test`` (and ``python test.py``): symmetric and asymmetric retrieval tests of trained networks."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raml import lazy_exports
from raml.cli.common import (
    add_bad_images_arg,
    check_output_files,
    comma_list,
    devices_from_gpu_id,
    image_sizes_arg,
    positive_int,
    setup_logging,
    write_json,
)
from raml.cli.networks import add_model_hint_args, add_multiscale_arg, add_runtime_args, check_multiscale_size
from raml.entry import add_network_args, dataset_inputs, network_from_args, network_inputs
from raml.retrieval.scales import SINGLE_SCALE

if TYPE_CHECKING:
    import torch

    from raml.data.check import apply_bad_image_policy
    from raml.data.splits import get_split
    from raml.retrieval.cache import EmbeddingCache
    from raml.retrieval.evaluate import evaluate_split, format_results_table
    from raml.retrieval.extract import inference_network
    from raml.utils import file_sha256

logger = logging.getLogger("raml")

#: raml test's query size for a student that records no trained size (the reference's test.py default)
DEFAULT_TEST_SIZE = 224

#: what :func:`run` uses of modules that import torch: attributes of this module imported on first use (the
#: names of the ``TYPE_CHECKING`` block above), so that building the parser imports none of them
_RUN_IMPORTS = {
    "apply_bad_image_policy": "raml.data.check",
    "get_split": "raml.data.splits",
    "EmbeddingCache": "raml.retrieval.cache",
    "evaluate_split": "raml.retrieval.evaluate",
    "format_results_table": "raml.retrieval.evaluate",
    "inference_network": "raml.retrieval.extract",
    "file_sha256": "raml.utils",
}
__getattr__, __dir__ = lazy_exports(__name__, _RUN_IMPORTS)


def _import_run_names() -> None:
    """Make each name of :data:`_RUN_IMPORTS` a global of this module; one already set (imported before, or
    replaced by a test) stays as it is."""
    module = sys.modules[__name__]
    for name in _RUN_IMPORTS:
        getattr(module, name)


class _StoreGiven(argparse.Action):
    """Store the value and note that the flag was given (``<dest>_given``): its default is then told apart from
    the same value passed on purpose."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``raml test``: every flag and alias of the reference's ``test.py``, plus our own."""
    parser = subparsers.add_parser(
        "test",
        description=(
            "Test a student symmetrically (--sym) and/or asymmetrically against a teacher database "
            "(runs when --teacher-path or --teacher is given). Accepts the reference test.py's flags."
        ),
    )
    add_network_args(parser, "student", required=True, short="-s", path_short="-spath", onnx=True)
    add_network_args(parser, "teacher", required=False, short="-t", path_short="-tpath")
    add_model_hint_args(parser)
    parser.add_argument(
        "-d",
        "--datasets",
        type=comma_list,
        default=["cub-test"],
        metavar="DATASETS",
        help="comma-separated test splits, e.g. 'cub-test,cars-test' (default: cub-test)",
    )
    parser.add_argument(
        "-imsize",
        "--image-size",
        type=image_sizes_arg,
        default=None,
        metavar="N[,N...]",
        help=f"query resolution QR (default: the student's first trained size, meta['image_sizes'], else "
        f"{DEFAULT_TEST_SIZE}; with --student-onnx the exported size); several sizes (e.g. 24,32,48) test each "
        "against the same teacher database, one row per size with its query GFLOPs",
    )
    parser.add_argument(
        "-timsize",
        "--teacher-image-size",
        type=positive_int,
        default=448,
        action=_StoreGiven,
        metavar="N",
        help="database resolution DR (default: 448; a warning names the size a student recorded as trained at "
        "when it differs)",
    )
    add_multiscale_arg(parser)
    parser.add_argument("--sym", action="store_true", help="also run the symmetric test of the student")
    parser.add_argument(
        "--not-pretrained",
        action="store_true",
        help="random weights for networks built with --student/--teacher ARCH",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write results (percent) as JSON")
    parser.add_argument(
        "--index",
        type=Path,
        metavar="INDEX_DIR",
        help="database side of the asymmetric test from an index built by 'raml index' on the test split "
        "(measures what an approximate index costs); replaces --teacher-path/--teacher",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not cache the teacher's database embeddings")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="opt-in: both networks' forward in bfloat16 autocast (fast only on CPUs with AVX-512 BF16 or AMX, "
        "or a GPU with bf16); off by default, the paper's numbers are fp32; bf16 embeddings are not cached",
    )
    from raml.cli.extract import add_cpu_runtime_arg, add_val_ratio_arg  # here: keeps this module's imports

    add_val_ratio_arg(parser)
    add_cpu_runtime_arg(parser)
    add_bad_images_arg(parser)
    add_runtime_args(
        parser,
        gpu_help="GPU ids: the student runs on the first, the teacher on the second when two are given "
        "('0,1'); the CPU when no GPU is visible (default: '0')",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from raml.engine.val_ratio import resolve_val_ratio

    _import_run_names()
    setup_logging(args.verbose)
    if args.index is not None and (args.teacher_path is not None or args.teacher is not None):
        raise SystemExit("raml test: --index replaces the teacher; give either --index or --teacher-path/--teacher.")
    if args.index is not None and len(args.datasets) != 1:
        raise SystemExit("raml test: --index holds one split; test one dataset at a time with it.")
    if args.teacher_path is None and args.teacher is None and args.index is None and not args.sym:
        raise SystemExit(
            "raml test: nothing to do: give --teacher-path/--teacher for the asymmetric test and/or --sym."
        )
    if args.index is not None and args.multiscale != SINGLE_SCALE:
        raise SystemExit("raml test: --index does not support multi-scale queries; drop --multiscale.")
    query_given = args.image_size is not None
    # None: the student's first trained size, known once it is loaded (below)
    sizes = None if args.image_size is None else _given_sizes(args)
    if args.json is not None:  # before any network is loaded or image embedded; never into what the test reads
        from raml.cli.deploy import index_files
        from raml.deploy.export import sidecar_path

        onnx_sidecar = None if args.student_onnx is None else sidecar_path(args.student_onnx)
        inputs = [
            *network_inputs("--student-path", args.student_path, args.data_root),
            *network_inputs("--teacher-path", args.teacher_path, args.data_root),
            ("--student-onnx", args.student_onnx),
            ("--student-onnx's sidecar", onnx_sidecar),
            *([index_files("--index", args.index)] if args.index is not None else []),
            *(source for name in args.datasets for source in dataset_inputs("--datasets", name, args.data_root)),
        ]
        check_output_files([("--json", args.json, None)], inputs)
    # the student on the first --gpu-id GPU, the teacher on the second when two are listed
    device, teacher_device = devices_from_gpu_id(args.gpu_id, args.device)
    # Resolve every split first so that a missing dataset fails before any network is loaded.
    val_ratio = resolve_val_ratio(args.val_ratio, [args.student_path, args.teacher_path], "raml test")
    resolved = [get_split(name, args.data_root, val_ratio) for name in args.datasets]
    student_file = None
    if args.student_onnx is not None:
        student = _onnx_student(args.student_onnx, sizes, args.multiscale)
        device = torch.device("cpu")  # onnxruntime runs on the CPU
    else:
        student, student_file = network_from_args(
            args.student_path,
            args.student,
            args.data_root,
            device,
            pooling=args.pool,
            whitening=args.whitening,
            pretrained=not args.not_pretrained,
        )
    trained_sizes = [int(size) for size in (getattr(student, "meta", None) or {}).get("image_sizes") or []]
    if sizes is None:
        if args.student_onnx is not None:
            args.image_size = student.image_size  # the exported size
        else:
            args.image_size = trained_sizes[0] if trained_sizes else DEFAULT_TEST_SIZE
        sizes = _given_sizes(args)
        logger.info("Query size %d px (--image-size not given: %s)", sizes[0],
                    "the student's first trained size" if trained_sizes else "the default")  # fmt: skip
    from raml.deploy.search import recorded_image_sizes, warn_if_default_sizes, warn_if_untrained_size

    for size in sizes:
        warn_if_untrained_size(size, trained_sizes, str(args.student_onnx or args.student_path or args.student))
    has_teacher = args.teacher_path is not None or args.teacher is not None
    # a size left at its default while the checkpoint records another one it was trained at (one query size:
    # a multi-size student's meta["image_sizes"] gives the default query size itself)
    query_default = None if query_given or trained_sizes else sizes[0]
    database_default = (
        args.teacher_image_size
        if has_teacher and args.index is None and not getattr(args, "teacher_image_size_given", False)
        else None
    )
    if student_file is not None and (query_default is not None or database_default is not None):
        warn_if_default_sizes(
            str(args.student_path), "testing", recorded_image_sizes(student_file), query_default, database_default
        )
    # each image is checked at the largest size it is embedded at (query sizes, the teacher's database size):
    # one the evaluation transform would resize to too many pixels is a bad image now, not an error mid-test
    splits, skipped = [], {}
    check_size = max([*sizes, args.teacher_image_size] if has_teacher else sizes)
    for split in resolved:
        split, bad = apply_bad_image_policy(split, args.bad_images, workers=max(1, args.workers), image_size=check_size)
        splits.append(split)
        skipped[split.name] = len(bad)
    teacher = teacher_file = None
    if args.teacher_path is not None or args.teacher is not None:
        teacher, teacher_file = network_from_args(
            args.teacher_path,
            args.teacher,
            args.data_root,
            teacher_device,
            pooling=args.pool,
            whitening=args.whitening,
            pretrained=not args.not_pretrained,
        )
    if not args.bf16:  # the fp32 forward on the CPU through onnxruntime (checked) unless --cpu-runtime torch
        student = inference_network(student, device, "fp32", args.cpu_runtime)
        if teacher is not None:
            teacher = inference_network(teacher, teacher_device, "fp32", args.cpu_runtime)
    cache = None if args.no_cache else EmbeddingCache(Path(args.data_root) / "cache" / "embeddings")
    teacher_sha = file_sha256(teacher_file) if teacher_file is not None else None

    # what the exact test of one size and of several sizes share
    options: dict[str, Any] = {
        "teacher": teacher,
        "teacher_image_size": args.teacher_image_size,
        "sym": args.sym,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "cache": cache,
        "teacher_sha256": teacher_sha,
        "progress": not args.no_progress,
        "teacher_device": teacher_device,
        "query_scales": args.multiscale,
        "content_hash": args.hash_images,
    }
    if args.bf16:
        if len(sizes) > 1 or args.index is not None:
            raise SystemExit("raml test: --bf16 works with one --image-size and without --index")
        options["precision"] = "bf16"
    if len(sizes) > 1:
        return _run_sizes(args, sizes, student, splits, skipped, device, options)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for split in splits:
        if args.index is not None:
            from raml.deploy.search import evaluate_with_index

            results[split.name] = {
                "asym": evaluate_with_index(
                    student,
                    split,
                    args.image_size,
                    args.index,
                    device,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    progress=not args.no_progress,
                )
            }
            if args.sym:
                results[split.name].update(
                    evaluate_split(
                        student,
                        split,
                        args.image_size,
                        device,
                        sym=True,
                        batch_size=args.batch_size,
                        workers=args.workers,
                        progress=not args.no_progress,
                    )
                )
            continue
        results[split.name] = evaluate_split(student, split, args.image_size, device, **options)
    for split in splits:
        for metrics in results[split.name].values():
            metrics["num_skipped_images"] = skipped[split.name]
    print(format_results_table(results))
    if args.json is not None:
        write_json(args.json, results)
    return 0


def _run_sizes(args, sizes, student, splits, skipped, device, options) -> int:  # noqa: ANN001
    """``--image-size 24,32,48``: every query size against the one teacher database, one row per size."""
    from raml.retrieval.sizes import evaluate_sizes, format_sizes_table

    entries = evaluate_sizes(student, splits, sizes, device, **options)
    for entry in entries:
        for name, tests in entry["results"].items():
            for metrics in tests.values():
                metrics["num_skipped_images"] = skipped[name]
    print(format_sizes_table(entries))
    if args.json is not None:
        write_json(args.json, {"sizes": entries})
    return 0


def _given_sizes(args: argparse.Namespace) -> list[int]:
    """The query sizes of ``args.image_size`` (one or a list), checked against --index and --multiscale;
    ``args.image_size`` becomes the first."""
    sizes = args.image_size if isinstance(args.image_size, list) else [args.image_size]
    if args.index is not None and len(sizes) > 1:
        raise SystemExit("raml test: --index tests one query size at a time; give a single --image-size.")
    args.image_size = sizes[0]
    check_multiscale_size("raml test", args.multiscale, max(sizes))
    return sizes


def _onnx_student(path: Path, sizes: list[int] | None, multiscale: tuple[float, ...]) -> torch.nn.Module:
    """``--student-onnx``: the exported student as a query network, after checking the flags it cannot serve
    (``sizes`` None: its exported size)."""
    from raml.deploy.onnx_network import OnnxQueryNetwork

    if sizes is not None and len(sizes) > 1:
        raise SystemExit("raml test: --student-onnx tests one query size at a time; give a single --image-size.")
    if tuple(multiscale) != SINGLE_SCALE:
        raise SystemExit("raml test: --student-onnx does not support multi-scale queries; drop --multiscale.")
    student = OnnxQueryNetwork(path)
    if sizes is not None:
        student.check_image_size(sizes[0])
    return student
