"""``raml index``, ``raml search`` and ``raml export``: the deployment path, flags -> typed calls of raml.deploy.

- ``raml index``: embed a folder, a list file or a dataset split with the teacher at DR into a faiss index
  directory (created, or appended to).
- ``raml search``: embed query images with the student at QR (PyTorch or an exported ONNX model) and print
  their nearest database images (optionally as JSON).
- ``raml export``: export a network to ONNX and/or TorchScript with a preprocessing sidecar, after a parity
  check against PyTorch.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from raml.cli.choices import (
    CALIBRATION_METHODS,
    EXPORT_TOLERANCE,
    EXPORTERS,
    INDEX_TYPES,
    MIN_COSINE,
    MIN_OPSET,
    MIN_WORST_COSINE,
    SHARD_SIZE,
)
from raml.cli.common import (
    add_bad_images_arg,
    add_runtime_args,
    check_output_files,
    device_from_args,
    positive_int,
    setup_logging,
    write_json,
)
from raml.entry import InputFiles, dataset_inputs, image_file_keys, network_inputs, refuse_inputs

if TYPE_CHECKING:
    import torch

    from raml.deploy.quantize import QuantizationReport

logger = logging.getLogger("raml")

DEFAULT_QUERY_SIZE = 224
DEFAULT_DATABASE_SIZE = 448


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``index``, ``search`` and ``export`` sub-commands."""
    _add_index_parser(subparsers)
    _add_search_parser(subparsers)
    _add_export_parser(subparsers)


def _add_source_args(parser: argparse.ArgumentParser, required: bool, what: str) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--images", type=Path, metavar="DIR", help=f"{what}: a folder of images (recursive, sorted)")
    group.add_argument(
        "--list",
        type=Path,
        metavar="FILE",
        help=f"{what}: a text file with one image path per line (relative to the file's folder)",
    )
    group.add_argument("--dataset", metavar="NAME", help=f"{what}: a dataset split under --data-root, e.g. 'cub-test'")


def _source_paths(args: argparse.Namespace) -> tuple[list[str], list[int] | None, str | None]:
    """Image paths (and labels and split name for a dataset) from --images / --list / --dataset."""
    from raml.data.splits import get_split
    from raml.deploy.image_files import collect_images, read_image_list

    if args.images is not None:
        return collect_images(args.images), None, None
    if args.list is not None:
        return read_image_list(args.list), None, None
    if args.dataset is not None:
        split = get_split(args.dataset, args.data_root)
        return [str(p) for p in split.abspaths()], list(split.labels), split.name
    return [], None, None


def _list_inputs(flag: str, list_file: Path | None) -> list[tuple[str, Path] | InputFiles]:
    """A list file and the images it names (as :func:`raml.deploy.image_files.read_image_list` reads them), for
    :func:`check_output_files`; a list that cannot be read gives the file alone (the command reports it)."""
    from raml.deploy.image_files import read_image_list

    if list_file is None:
        return []
    inputs: list[tuple[str, Path] | InputFiles] = [(flag, list_file)]
    try:
        images = read_image_list(list_file, flag)
    except (OSError, ValueError):
        return inputs
    return [*inputs, InputFiles(flag, f"an image that {flag} {str(list_file)!r} names", image_file_keys(images))]


def _folder_images(folder: Path) -> InputFiles:
    """The images :func:`raml.deploy.image_files.collect_images` takes from ``--images DIR``, matched by its rule
    (an existing file under the folder with an image extension, no hidden file or folder on the way) rather than by
    listing the folder; any other file there is fine."""
    from raml.data.splits import IMAGE_EXTENSIONS

    top = os.path.normcase(os.path.realpath(folder))

    def owns(parent: str, name: str) -> bool:
        if os.path.commonpath([parent, top]) != top:
            return False
        relative = Path(os.path.relpath(os.path.join(parent, name), top))
        return (
            not any(part.startswith(".") for part in relative.parts)
            and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            and os.path.isfile(os.path.join(parent, name))
        )

    return InputFiles("--images", f"an image of --images {str(folder)!r}", owns=owns)


def index_files(flag: str, index_dir: Path) -> InputFiles:
    """The files of the index in ``index_dir`` (its index.json, lock, generation and temporary files, by the store's
    names, and its bad-image reports), for :func:`check_output_files`: a report never replaces one of them; any
    other file there is fine."""
    from raml.deploy.bad_images import REPORT_NAMES
    from raml.deploy.store import METADATA_NAME, is_index_leftover

    folder = os.path.normcase(os.path.realpath(index_dir))

    def owns(parent: str, name: str) -> bool:
        return parent == folder and (name == METADATA_NAME or name in REPORT_NAMES or is_index_leftover(name))

    return InputFiles(flag, f"a file of the index {flag} {str(index_dir)!r}", owns=owns)


def _source_inputs(args: argparse.Namespace) -> list[tuple[str, Path] | InputFiles]:
    """The files --images / --list / --dataset read (the list files and the images), for
    :func:`check_output_files`."""
    return [
        *([_folder_images(args.images)] if args.images is not None else []),
        *_list_inputs("--list", args.list),
        *dataset_inputs("--dataset", args.dataset, args.data_root),
    ]


def _devices(args: argparse.Namespace) -> list[torch.device]:
    """The extraction devices: every visible GPU for --device auto/cuda when there are several, else one."""
    import torch

    device = device_from_args(args)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def _require_deps(*modules: str) -> None:
    import importlib

    # faiss's loader logs each instruction set it tries at INFO (eight lines before any message of ours)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            package = {"faiss": "faiss-cpu", "ray": "raml[ray]"}.get(module, module)
            raise SystemExit(
                f"raml: error: this command needs {module}; install it with `pip install {package}`."
            ) from error


# ------------------------------------------------------------------------------------------------ index


def _add_index_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        description=(
            "Embed images with the database network (the teacher) at --image-size (DR) and store them in a faiss "
            "inner-product index directory. If --output already holds an index, the images are appended (same "
            "network and size required; images already indexed are skipped). Every file is written atomically; "
            "index.json is replaced last, so an interrupted run leaves the previous index intact."
        ),
    )
    parser.add_argument("--network-path", required=True, metavar="NETWORK", help="database network checkpoint")
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=DEFAULT_DATABASE_SIZE,
        metavar="DR",
        help=f"database resolution (default {DEFAULT_DATABASE_SIZE})",
    )
    _add_source_args(parser, required=False, what="images to index")
    parser.add_argument("--output", type=Path, required=True, metavar="INDEX_DIR", help="the index directory")
    life = parser.add_argument_group("updates (ids are stable: a removed image's id is never given again)")
    life.add_argument("--remove", nargs="+", default=[], metavar="PATH", help="take these images out of the index")
    life.add_argument("--remove-list", type=Path, metavar="FILE", help="take the images listed in FILE out")
    life.add_argument(
        "--hash-images",
        action="store_true",
        help="re-embed an indexed image when its content (SHA-256) changed, not only its size or modification time",
    )
    scale = parser.add_argument_group("extraction (streamed into resumable shards; see docs/deployment.md)")
    scale.add_argument(
        "--shard-size",
        type=positive_int,
        default=SHARD_SIZE,
        metavar="N",
        help=f"images per shard; a killed run resumes at the first missing shard (default {SHARD_SIZE})",
    )
    scale.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: a Ray Data actor pool (pip install raml[ray])",
    )
    scale.add_argument(
        "--ray-address", metavar="ADDRESS", help="Ray cluster to join (default: start a local instance on 127.0.0.1)"
    )
    scale.add_argument(
        "--ray-actors", type=positive_int, metavar="N", help="embedding actors (default: one per GPU, else CPUs - 1)"
    )
    group = parser.add_argument_group("index type (for a new index; an append keeps the existing one)")
    group.add_argument(
        "--index-type",
        choices=INDEX_TYPES,
        default=None,
        help="flat (exact, default), ivf, hnsw or ivfpq (approximate); see docs/deployment.md",
    )
    group.add_argument("--nlist", type=positive_int, metavar="N", help="IVF cells (default ~4*sqrt(N))")
    group.add_argument("--nprobe", type=positive_int, metavar="N", help="IVF cells searched (default nlist/8)")
    group.add_argument("--m", type=positive_int, metavar="M", help="PQ sub-quantisers, divides D (default D/8)")
    group.add_argument("--nbits", type=positive_int, metavar="B", help="bits per PQ code (default 8)")
    group.add_argument("--hnsw-m", type=positive_int, metavar="M", help="HNSW links per node, 2-512 (default 32)")
    group.add_argument(
        "--ef-search", type=positive_int, metavar="N", help="HNSW search breadth, at most 1,000,000 (default 64)"
    )
    group.add_argument(
        "--train-size", type=positive_int, metavar="N", help="embeddings sampled to train IVF/PQ (default all, <= 200k)"
    )
    group.add_argument(
        "--on-disk",
        action="store_true",
        help="ivf/ivfpq: keep the inverted lists in their own file (invlists-<G>.ivfdata), built from per-chunk "
        "indexes and served memory-mapped, for an index larger than memory (appends keep the setting)",
    )
    parser.add_argument("--overwrite", action="store_true", help="rebuild the index instead of appending to it")
    add_bad_images_arg(parser)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write a summary as JSON")
    _add_index_forward_args(parser)
    add_runtime_args(parser)
    parser.set_defaults(func=run_index)


def _add_index_forward_args(parser: argparse.ArgumentParser) -> None:
    """``raml index``'s forward flags, as ``raml extract``'s: ``--bf16`` and ``--cpu-runtime``."""
    from raml.cli.extract import add_cpu_runtime_arg

    parser.add_argument(
        "--bf16",
        action="store_true",
        help="opt-in: the forward in bfloat16 autocast (fast only on CPUs with AVX-512 BF16 or AMX, or a GPU with "
        "bf16); off by default, the paper's numbers are fp32; --engine local only",
    )
    add_cpu_runtime_arg(parser)


def run_index(args: argparse.Namespace) -> int:
    """``raml index``."""
    from raml.deploy.faiss_index import IndexParams
    from raml.deploy.image_files import read_image_list
    from raml.deploy.index import index_images
    from raml.deploy.store import METADATA_NAME, load_index
    from raml.models import checkpoint_sha256, load_network
    from raml.retrieval.extract import inference_network

    setup_logging(args.verbose)
    if args.json is not None:  # before anything is embedded or committed; never into what the command reads
        inputs = [
            *network_inputs("--network-path", args.network_path, args.data_root),
            *_source_inputs(args),
            *_list_inputs("--remove-list", args.remove_list),
            index_files("--output", args.output),
        ]
        check_output_files([("--json", args.json, None)], inputs)
    _require_deps("faiss")
    flags = ("index_type", "nlist", "nprobe", "m", "nbits", "hnsw_m", "ef_search", "train_size")
    params = None
    if any(getattr(args, name) is not None for name in flags) or args.on_disk:
        index_type = args.index_type
        if index_type is None:  # tuning flags alone: keep the type of the index being appended to
            appending = (args.output / METADATA_NAME).is_file() and not args.overwrite
            index_type = load_index(args.output).meta["index_type"] if appending else "flat"
        given = {name: getattr(args, name) for name in flags[1:] if getattr(args, name) is not None}
        params = IndexParams(index_type=index_type, on_disk=args.on_disk, **given)
    paths, labels, dataset = _source_paths(args)
    remove = [
        *args.remove,
        *(read_image_list(args.remove_list, "--remove-list") if args.remove_list is not None else []),
    ]
    if not paths and not remove:
        raise SystemExit("raml index: error: give the images to index (--images, --list or --dataset) and/or --remove.")
    devices = _devices(args)
    network = load_network(args.network_path, data_root=args.data_root, device=devices[0])
    if args.bf16 and args.engine != "local":
        raise SystemExit("raml index: --bf16 runs with --engine local; drop one of them.")
    forward = inference_network(network, devices[0], "bf16" if args.bf16 else "fp32", args.cpu_runtime)
    engine = None
    if args.engine == "ray":
        _require_deps("ray")
        from raml.deploy.ray_engine import RayOptions, ray_engine

        engine = ray_engine(
            RayOptions(
                network_path=str(network.source_path),
                image_size=args.image_size,
                batch_size=args.batch_size,
                address=args.ray_address,
                actors=args.ray_actors,
                data_root=args.data_root,
            )
        )
    summary = index_images(
        forward,
        paths,
        args.image_size,
        args.output,
        network_sha256=checkpoint_sha256(network.source_path),
        network_path=network.source_path,
        labels=labels,
        dataset=dataset,
        params=params,
        overwrite=args.overwrite,
        devices=devices,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.no_progress,
        remove=remove,
        hash_images=args.hash_images,
        shard_size=args.shard_size,
        engine=engine,
        bad_images=args.bad_images,
    )
    if summary["bad_images_skipped"]:
        print(f"{summary['bad_images_skipped']} bad image(s) skipped, listed in {summary['bad_images_report']}")
    print(
        f"{summary['index_dir']}: {summary['added']} added, {summary['reembedded']} re-embedded (file changed), "
        f"{summary['removed']} removed, {summary['skipped']} skipped (already indexed), "
        f"{summary['count']} images in a {summary['index_type']} index (generation {summary['generation']})"
    )
    if args.json is not None:
        write_json(args.json, summary)
    return 0


# ------------------------------------------------------------------------------------------------ search


def _add_search_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        description=(
            "Embed query images with the query network (the student) at --image-size (QR), or with an exported "
            "ONNX model (--onnx, preprocessing from its sidecar), and list their k nearest images in an index built "
            "by `raml index`."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--network-path", metavar="NETWORK", help="query network checkpoint (the student)")
    source.add_argument("--onnx", type=Path, metavar="FILE", help="an ONNX model written by `raml export`")
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        metavar="QR",
        help=f"query resolution, per call (default {DEFAULT_QUERY_SIZE}; with --onnx the exported size; for a "
        "student trained for several query sizes the first of them)",
    )
    parser.add_argument("--index", type=Path, required=True, metavar="INDEX_DIR", help="index built by raml index")
    parser.add_argument("--k", type=positive_int, default=10, metavar="K", help="results per query (default 10)")
    parser.add_argument("--nprobe", type=positive_int, metavar="N", help="override the IVF cells searched")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--gallery",
        type=Path,
        metavar="PATH.png",
        help="also draw the results: one row per query with its top-k thumbnails, framed green (same label) or red "
        "(other label) where the index stores labels and the query is one of its images, grey otherwise",
    )
    parser.add_argument("queries", nargs="+", metavar="QUERY_IMAGE", help="query image files")
    add_runtime_args(parser)
    parser.set_defaults(func=run_search)


def run_search(args: argparse.Namespace) -> int:
    """``raml search``."""
    from raml.deploy.embed import embed_images
    from raml.deploy.image_files import check_images_exist
    from raml.deploy.search import (
        OnnxEmbedder,
        check_query_dim,
        format_search_table,
        recorded_image_sizes,
        recorded_teacher_sha256,
        search_images,
        warn_if_default_sizes,
        warn_if_other_teacher,
        warn_if_untrained_size,
    )
    from raml.deploy.store import load_index
    from raml.models import load_network

    setup_logging(args.verbose)
    _require_deps("faiss", *(["onnxruntime"] if args.onnx is not None else []))
    # both outputs, checked once each and told apart (they must not name one file), and never an input
    from raml.deploy.export import sidecar_path

    inputs = [
        *network_inputs("--network-path", args.network_path, args.data_root),
        ("--onnx", args.onnx),
        ("--onnx's sidecar", None if args.onnx is None else sidecar_path(args.onnx)),
        index_files("--index", args.index),
        *(("QUERY_IMAGE", query) for query in args.queries),
    ]
    outputs = [(flag, path, None) for flag, path in (("--json", args.json), ("--gallery", args.gallery)) if path]
    check_output_files(outputs, inputs)
    if args.gallery is not None:  # a bad gallery path fails before anything is embedded or written
        from raml.deploy.gallery import check_gallery_path

        check_gallery_path(args.gallery)
    index = load_index(args.index)
    # the database's images (the gallery reads them for its thumbnails), known once the index is loaded
    indexed = InputFiles(
        "--index", f"an image of the index --index {str(args.index)!r}", image_file_keys(p for p in index.paths if p)
    )
    refuse_inputs(outputs, [indexed])
    queries = [str(q) for q in args.queries]
    if args.onnx is not None:
        embedder = OnnxEmbedder(args.onnx, args.image_size)
        check_query_dim(embedder.output_dim, index)
        warn_if_other_teacher(embedder.teacher_sha256, index)
        check_images_exist(queries)
        embeddings = embedder.embed(queries, args.batch_size, args.workers, progress=not args.no_progress)
    else:
        device = device_from_args(args)
        network = load_network(args.network_path, data_root=args.data_root, device=device)
        check_query_dim(network.output_dim, index)
        warn_if_other_teacher(recorded_teacher_sha256(network.source_path), index)
        check_images_exist(queries)
        # a student trained for several query sizes: the query size is chosen per call, the first by default
        trained_sizes = network.meta.get("image_sizes")
        size = args.image_size or (int(trained_sizes[0]) if trained_sizes else DEFAULT_QUERY_SIZE)
        warn_if_untrained_size(size, trained_sizes, str(args.network_path))
        if args.image_size is None and not trained_sizes:  # the default, where the checkpoint may record another
            recorded = recorded_image_sizes(network.source_path)
            warn_if_default_sizes(str(args.network_path), "searching", (recorded[0], None), size)
        embeddings = embed_images(
            network, queries, size, [device], args.batch_size, args.workers, not args.no_progress, f"queries@{size}"
        )
    results = search_images(index, embeddings, queries, args.k, nprobe=args.nprobe)
    print(format_search_table(results))
    if args.json is not None:
        write_json(args.json, results)
    if args.gallery is not None:
        from raml.deploy.gallery import search_gallery_rows, write_gallery
        from raml.deploy.image_files import image_key

        rows = search_gallery_rows(results, index.paths, index.labels.tolist(), key=image_key)
        print(f"gallery: {write_gallery(rows, args.gallery)}")
    return 0


# ------------------------------------------------------------------------------------------------ export


def _add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        description=(
            "Export a network (on the CPU) to ONNX (--output) and/or TorchScript (--torchscript), with a dynamic "
            "batch axis, and write its preprocessing to <file>.json next to each file. Each export is checked "
            "against PyTorch on random inputs (and on real images with --images/--list/--dataset); a maximum "
            "absolute difference above --tolerance fails the command and writes nothing."
        ),
    )
    parser.add_argument("--network-path", required=True, metavar="NETWORK", help="network checkpoint to export")
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        metavar="S",
        help=f"input resolution (default {DEFAULT_QUERY_SIZE}; for a student trained for several query sizes the "
        "first of them, exported with a dynamic side and checked at each of them)",
    )
    parser.add_argument("--output", type=Path, metavar="FILE.onnx", help="ONNX file to write")
    parser.add_argument("--torchscript", type=Path, metavar="FILE.pt", help="TorchScript file to write")
    parser.add_argument("--dynamic-size", action="store_true", help="make height and width dynamic axes too")
    parser.add_argument(
        "--opset", type=positive_int, default=MIN_OPSET, metavar="N", help=f"ONNX opset (>= {MIN_OPSET})"
    )
    parser.add_argument(
        "--exporter", choices=EXPORTERS, default="auto", help="ONNX exporter (auto: torchscript-based, then dynamo)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=EXPORT_TOLERANCE, help=f"max abs difference (default {EXPORT_TOLERANCE:g})"
    )
    _add_source_args(parser, required=False, what="real images for the parity check")
    parser.add_argument(
        "--max-images", type=positive_int, default=16, metavar="N", help="real images checked (default 16)"
    )
    parser.add_argument("--data-root", default="data", metavar="DATA_DIR", help="folder holding datasets/networks")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the export report as JSON")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing model files and sidecars (refused otherwise, before anything is exported)",
    )
    int8 = parser.add_argument_group("int8 (static quantisation of the ONNX export, onnxruntime, QDQ)")
    int8.add_argument(
        "--int8",
        action="store_true",
        help="write --output as an int8 model: the fp32 export (parity-checked) quantised with activation ranges "
        "calibrated on --calibration-images images of --calibration-split; kept only if its embeddings stay "
        "within --min-cosine of the fp32 model's",
    )
    int8.add_argument("--calibration-split", metavar="NAME", help="dataset split of the calibration images (--int8)")
    int8.add_argument(
        "--calibration-images",
        type=positive_int,
        default=64,
        metavar="N",
        help="calibration images, evenly spaced over the split (default 64)",
    )
    int8.add_argument(
        "--calibration-method", choices=CALIBRATION_METHODS, default="minmax", help="activation ranges (default minmax)"
    )
    int8.add_argument(
        "--min-cosine",
        type=float,
        default=MIN_COSINE,
        metavar="C",
        help=f"smallest mean fp32/int8 embedding cosine similarity accepted (default {MIN_COSINE})",
    )
    int8.add_argument(
        "--min-worst-cosine",
        type=float,
        default=MIN_WORST_COSINE,
        metavar="C",
        help="smallest fp32/int8 cosine similarity accepted for any one held-out image at any served size "
        f"(default {MIN_WORST_COSINE})",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """``raml export``."""
    from raml.deploy.export import export_onnx, export_torchscript
    from raml.deploy.export_stage import ExportStage
    from raml.deploy.image_files import check_images_exist
    from raml.deploy.quantize import QuantizationReport
    from raml.deploy.search import (
        recorded_image_sizes,
        recorded_teacher_sha256,
        warn_if_default_sizes,
        warn_if_untrained_size,
    )
    from raml.models import checkpoint_sha256, load_network

    setup_logging(args.verbose)
    if args.output is None and args.torchscript is None:
        raise SystemExit("raml export: error: give --output FILE.onnx and/or --torchscript FILE.pt.")
    if args.output is not None and args.output.suffix.lower() != ".onnx":
        raise SystemExit(f"raml export: error: --output must end in .onnx, got {args.output}.")
    _check_export_outputs(args)
    if args.output is not None:
        _require_deps("onnx", "onnxruntime")
    calibration = _int8_calibration(args)  # [] without --int8; a bad split fails here, before anything is written
    paths, _, _ = _source_paths(args)
    paths = paths[: args.max_images]
    check_images_exist(paths)
    if (
        args.int8
        and not calibration[1]
        and not {str(Path(p).resolve()) for p in paths} - {str(Path(p).resolve()) for p in calibration[0]}
    ):  # before the fp32 export: the int8 check needs images that calibration did not see
        raise SystemExit(
            f"raml export: error: --int8 checks the int8 model on images not used for calibration, but "
            f"--calibration-images {args.calibration_images} takes every image of --calibration-split "
            f"{args.calibration_split}; give a smaller --calibration-images, or other images with --images or --list."
        )
    network = load_network(args.network_path, data_root=args.data_root, device="cpu")
    # a student trained for several query sizes (meta["image_sizes"]): one graph for all of them
    trained_sizes = [int(v) for v in network.meta.get("image_sizes") or []]
    multi_size = len(trained_sizes) > 1 and not network.meta.get("bn_sizes")
    if args.image_size is None:
        args.image_size = trained_sizes[0] if trained_sizes else DEFAULT_QUERY_SIZE
        if not trained_sizes:  # the default, where the checkpoint may record another size it was trained at
            recorded = recorded_image_sizes(network.source_path)
            warn_if_default_sizes(str(args.network_path), "exporting", (recorded[0], None), args.image_size)
    warn_if_untrained_size(args.image_size, trained_sizes, str(args.network_path))
    common = {
        "dynamic_size": args.dynamic_size or multi_size,
        "check_sizes": trained_sizes if multi_size else [],
        "image_paths": paths,
        "tolerance": args.tolerance,
        "network_sha256": checkpoint_sha256(network.source_path),
        "network_path": network.source_path,
        "teacher_sha256": recorded_teacher_sha256(network.source_path),
    }
    reports = []
    with ExportStage([t for t in (args.output, args.torchscript) if t is not None]) as stage:
        if args.output is not None and args.int8:
            reports.append(_export_int8(network, args, stage.path(args.output), common, calibration))
        elif args.output is not None:
            onnx_file = stage.path(args.output)
            reports.append(
                export_onnx(
                    network,
                    args.image_size,
                    onnx_file,
                    opset=args.opset,
                    exporter=args.exporter,
                    target=args.output,
                    **common,
                )
            )
        if args.torchscript is not None:
            torchscript_file = stage.path(args.torchscript)
            reports.append(
                export_torchscript(network, args.image_size, torchscript_file, target=args.torchscript, **common)
            )
        reports = [stage.commit(report) for report in reports]
    for report in reports:
        if isinstance(report, QuantizationReport):
            print(
                f"onnx int8 {report.path}: {report.int8_bytes} bytes (fp32 {report.fp32_bytes}); embeddings' cosine "
                f"similarity to fp32 mean {report.mean_cosine:.4f}, min {report.min_cosine:.4f} on "
                f"{report.checked_images} held-out images at sizes {', '.join(map(str, report.sizes))}; calibrated on "
                f"{report.calibration_images} images of "
                f"{args.calibration_split}; preprocessing in {report.sidecar}"
            )
            continue
        images = (
            f", {report.max_abs_diff_images:.3g} on {report.num_images} images"
            if report.max_abs_diff_images is not None
            else ""
        )
        print(
            f"{report.kind} {report.path} ({report.exporter}): max abs difference {report.max_abs_diff_random:.3g} "
            f"on random inputs{images} (tolerance {args.tolerance:g}); preprocessing in {report.sidecar}"
        )
    if args.json is not None:
        write_json(args.json, [r.as_dict() for r in reports])
    return 0


def _check_export_outputs(args: argparse.Namespace) -> None:
    """Every file ``raml export`` writes, checked before the network is loaded: the models and their sidecars
    (an existing one only replaced with --overwrite) and the --json report; all different files, none of them
    (even with --overwrite) the checkpoint, an image source or a dataset the command reads."""
    from raml.deploy.export import sidecar_path

    targets: list[tuple[str, Path, bool | None]] = []
    for flag, model in (("--output", args.output), ("--torchscript", args.torchscript)):
        if model is not None:
            targets += [(flag, model, args.overwrite), (f"{flag}'s sidecar", sidecar_path(model), args.overwrite)]
    if args.json is not None:
        targets.append(("--json", args.json, None))
    inputs = [
        *network_inputs("--network-path", args.network_path, args.data_root),
        *_source_inputs(args),
        *dataset_inputs("--calibration-split", args.calibration_split, args.data_root),
    ]
    check_output_files(targets, inputs)


def _int8_calibration(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The calibration images of ``--int8`` (evenly spaced over the split) and as many held-out images of the
    split to check the int8 model on (evenly spaced over the rest), after checking the flags."""
    from raml.data.splits import get_split
    from raml.deploy.image_files import check_images_exist
    from raml.deploy.quantize import evenly_spaced

    if not args.int8:
        if args.calibration_split is not None:
            raise SystemExit("raml export: error: --calibration-split is used with --int8 only; add --int8.")
        return [], []
    if args.output is None:
        raise SystemExit("raml export: error: --int8 quantises the ONNX export; give --output FILE.onnx.")
    if args.calibration_split is None:
        raise SystemExit(
            "raml export: error: --int8 needs calibration images like the queries: give --calibration-split NAME "
            "(a dataset split under --data-root, e.g. cub-train)."
        )
    split = get_split(args.calibration_split, args.data_root)
    every = [str(p) for p in split.abspaths()]
    paths = evenly_spaced(every, args.calibration_images)
    chosen = set(paths)
    rest = [p for p in every if p not in chosen]
    held_out = evenly_spaced(rest, args.calibration_images) if rest else []
    check_images_exist(paths + held_out)
    return paths, held_out


def _export_int8(
    network: torch.nn.Module,
    args: argparse.Namespace,
    output: Path,
    common: dict,
    calibration: tuple[list[str], list[str]],
) -> QuantizationReport:
    """Export fp32 ONNX to a temporary file (parity-checked against PyTorch), quantise it into ``output`` (--output's
    file in its staging folder). The fp32 model is written in a subfolder of that staging folder, so that it goes
    with it, even when the export is killed (the next export of --output removes the folder)."""
    import shutil

    from raml.deploy.export import export_onnx
    from raml.deploy.quantize import quantize_onnx

    work = output.parent / "fp32"  # no suffix: never --output's name (.onnx) nor its sidecar's
    work.mkdir()
    try:
        fp32 = work / "fp32.onnx"
        export_onnx(
            network, args.image_size, fp32, opset=args.opset, exporter=args.exporter, target=args.output, **common
        )
        return quantize_onnx(
            fp32,
            output,
            calibration[0],
            check_paths=[*calibration[1], *common["image_paths"]],  # images not used for calibration
            method=args.calibration_method,
            min_cosine=args.min_cosine,
            min_worst_cosine=args.min_worst_cosine,
            calibration_split=args.calibration_split,
            source_label=str(network.source_path),
            work_dir=work,
            target=args.output,
        )
    finally:  # not kept until the staging folder goes: the disk space of a large model
        shutil.rmtree(work, ignore_errors=True)
