"""``raml extract``: embed a dataset split with a network and save the (N, D) embeddings as ``.npy``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from raml.cli.common import (
    add_bad_images_arg,
    check_output_files,
    devices_from_gpu_id,
    positive_int,
    setup_logging,
)
from raml.cli.networks import add_model_hint_args, add_multiscale_arg, add_runtime_args, check_multiscale_size
from raml.engine.config import RUN_CONFIG_NAME
from raml.entry import add_network_args, network_from_args
from raml.retrieval.scales import CPU_RUNTIMES

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger("raml")


def add_cpu_runtime_arg(parser: argparse.ArgumentParser) -> None:
    """``--cpu-runtime {auto,onnxruntime,torch}``: how the fp32 forward runs on the CPU (``raml extract``,
    ``raml test``, ``raml index``)."""
    parser.add_argument(
        "--cpu-runtime",
        choices=CPU_RUNTIMES,
        default="auto",
        help="how the fp32 forward runs on the CPU: auto (default): onnxruntime (~2x faster on this project's CPU; "
        "the export costs seconds per size) for a job of at least 64 images at 224 px (or as many pixels) once a "
        "check on its first images shows the network's embeddings within 1e-4, else PyTorch; onnxruntime: for "
        "every job, an error instead of the fallback; torch: PyTorch's eager forward. A GPU always runs PyTorch.",
    )


def _val_ratio(value: str) -> float:
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if not _valid_val_ratio(ratio):
        raise argparse.ArgumentTypeError(f"expected a share of the training classes in [0, 1), got {value!r}")
    return ratio


def _default_val_ratio() -> float:
    from raml.engine.config import TrainConfig

    return TrainConfig.val_ratio


def add_val_ratio_arg(parser: argparse.ArgumentParser) -> None:
    """``--val-ratio R`` of ``raml test`` and ``raml extract``; see :func:`resolve_val_ratio`."""
    parser.add_argument(
        "--val-ratio",
        type=_val_ratio,
        metavar="R",
        help="share of the training classes held out as validation classes (the -val, -train and -trainval "
        "parts of cub, cars, sop and synth; split files and folder layouts define their own). Default: the "
        "val_ratio the checkpoint's training recorded (in the checkpoint itself; for an older checkpoint in the "
        f"{RUN_CONFIG_NAME} beside it), else "
        f"{_default_val_ratio()}; a value that differs from the recorded one is used, with a warning",
    )


def _valid_val_ratio(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0.0 <= value < 1.0


def checkpoint_val_ratio(path: Path) -> float | None:
    """The ``val_ratio`` a ``raml train`` checkpoint records in its own ``"raml"`` record (written by
    :meth:`raml.engine.trainer.Trainer._save`), or None: an older checkpoint, another program's, or a file this
    cannot read (the network's own load reports that). The tensors are memory-mapped, not read
    (:func:`raml.models.checkpoints.run_record`)."""
    from raml.models.checkpoints import run_record

    record = run_record(path)
    value = record.get("val_ratio") if record is not None else None
    return float(value) if _valid_val_ratio(value) else None


def _config_val_ratio(path: Path) -> tuple[float, Path] | None:
    """The ``val_ratio`` of the ``config.yaml`` beside the checkpoint ``path``, with that file; None without one.
    A ``config.yaml`` that cannot be read or holds no valid ``val_ratio`` is ignored, with a warning."""
    config = path.parent / RUN_CONFIG_NAME
    if not config.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        logger.warning("Ignoring %s beside the checkpoint %s: cannot read it (%s).", config, path, error)
        return None
    value = data.get("val_ratio") if isinstance(data, dict) else None
    if value is None:
        return None
    if not _valid_val_ratio(value):
        logger.warning("Ignoring val_ratio %r in %s: expected a number in [0, 1).", value, config)
        return None
    return float(value), config


def recorded_val_ratio(checkpoint: str | Path | None) -> tuple[float, Path] | None:
    """The ``val_ratio`` of the training run a checkpoint file comes from, with the file that records it; None for
    a name, a missing file, or nothing recorded.

    The checkpoint's own record comes first (:func:`checkpoint_val_ratio`): the ``config.yaml`` in its folder
    is rewritten at the start of every ``raml train`` into that folder (``--overwrite``), before that run
    replaces (or without it ever replacing) an older run's ``model_best``. A ``config.yaml`` that disagrees is
    named in a warning; for a checkpoint without a record (written before the record held ``val_ratio``) it is
    the fallback."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        return None
    own = checkpoint_val_ratio(path)
    config = _config_val_ratio(path)
    if own is None:
        return config
    if config is not None and config[0] != own:
        logger.warning(
            "The checkpoint %s records val_ratio %s, but the %s beside it says %s (a later raml train into that "
            "folder, which has not replaced this checkpoint): the checkpoint's own %s is used.",
            path,
            own,
            config[1],
            config[0],
            own,
        )
    return own, path


def resolve_val_ratio(given: float | None, checkpoints: list[str | None], command: str) -> float:
    """The val_ratio a command's splits use: ``given`` (``--val-ratio``) when set, else the one recorded by the
    first of ``checkpoints`` that has one (:func:`recorded_val_ratio`), else the library's default. A given
    value that differs from the recorded one is used, with a warning (its -val classes are not the run's)."""
    recorded = next((r for r in map(recorded_val_ratio, checkpoints) if r is not None), None)
    if given is None:
        if recorded is None:
            return _default_val_ratio()
        logger.info("%s: --val-ratio %s, as recorded in %s.", command, recorded[0], recorded[1])
        return recorded[0]
    if recorded is not None and recorded[0] != given:
        logger.warning(
            "%s: --val-ratio %s differs from the val_ratio %s the checkpoint's training used (%s): the -val, "
            "-train and -trainval parts of registered datasets then hold other classes than that run's (a -val "
            "split may include classes it trained on). Drop --val-ratio to use the recorded value.",
            command,
            given,
            recorded[0],
            recorded[1],
        )
    return given


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """``raml extract``: the reference's ``extract_features.py`` flags where they apply, one split per call."""
    parser = subparsers.add_parser(
        "extract",
        description=(
            "Embed every image of a split (rows in split order) and write them to --output as float32 .npy, "
            "with a JSON description (paths, labels, network, size, scales) beside it. Embeddings of a checkpoint "
            "are cached under <data-root>/cache/embeddings, keyed by the checkpoint's content hash, the network's "
            "configuration as loaded (pooling, whitening, ...: --pool/--whitening for a checkpoint without meta), "
            "the size, the scales, the split and each image's size and modification time, so later runs (e.g. a "
            "teacher's database side) reuse them."
        ),
    )
    add_network_args(parser, "network", required=True, path_short="-npath")
    add_model_hint_args(parser)
    parser.add_argument("--dataset", required=True, metavar="NAME", help="split to embed, e.g. 'cub-test'")
    parser.add_argument(
        "-imsize",
        "--image-size",
        type=positive_int,
        default=448,
        metavar="N",
        help="resolution (default 448)",
    )
    add_multiscale_arg(parser)
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        metavar="FILE.npy",
        help="where to write the embeddings; their description goes to FILE.json beside it",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing FILE.npy / FILE.json (refused otherwise, before any work)",
    )
    parser.add_argument("--not-pretrained", action="store_true", help="random weights with --network ARCH")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="opt-in: the forward in bfloat16 autocast (fast only on CPUs with AVX-512 BF16 or AMX, or a GPU with "
        "bf16); off by default, the paper's numbers are fp32; bf16 embeddings are not cached",
    )
    add_val_ratio_arg(parser)
    add_cpu_runtime_arg(parser)
    add_bad_images_arg(parser)
    add_runtime_args(parser, gpu_help="GPU id the network runs on (the first when several are listed; default: '0')")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from raml.data.check import apply_bad_image_policy
    from raml.data.splits import get_split
    from raml.distributed import init_distributed
    from raml.retrieval.cache import EmbeddingCache
    from raml.retrieval.extract import extract_embeddings_sharded, multiscale_power
    from raml.utils import file_sha256

    setup_logging(args.verbose)
    if args.output.suffix != ".npy":
        raise SystemExit(f"raml extract: --output must end in .npy, got {args.output}")
    check_multiscale_size("raml extract", args.multiscale, args.image_size)
    # every output is checked before any work: a bad path fails now, not after the embedding
    sidecar = args.output.with_suffix(".json")
    check_output_files([("--output", args.output, args.overwrite), ("--output's sidecar", sidecar, args.overwrite)])
    # under torchrun every process embeds a share of the split; rank 0 writes the outputs
    dist, dist_device = init_distributed(args.device)
    device = dist_device or devices_from_gpu_id(args.gpu_id, args.device)[0]
    split, bad = apply_bad_image_policy(
        get_split(args.dataset, args.data_root, resolve_val_ratio(args.val_ratio, [args.network_path], "raml extract")),
        args.bad_images,
        workers=max(1, args.workers),
        image_size=args.image_size,
    )
    network, checkpoint = network_from_args(
        args.network_path,
        args.network,
        args.data_root,
        device,
        pooling=args.pool,
        whitening=args.whitening,
        pretrained=not args.not_pretrained,
    )
    paths = [str(p) for p in split.abspaths()]

    def compute():
        return extract_embeddings_sharded(
            network,
            paths,
            args.image_size,
            device,
            dist,
            args.batch_size,
            args.workers,
            progress=not args.no_progress,
            description=f"{split.name}@{args.image_size}",
            scales=args.multiscale,
            precision="bf16" if args.bf16 else "fp32",
            runtime=args.cpu_runtime,
        )

    sha = file_sha256(checkpoint) if checkpoint is not None else None
    if sha is not None and not args.no_cache and not args.bf16:
        cache = EmbeddingCache(Path(args.data_root) / "cache" / "embeddings")
        embeddings = cache.get_or_compute(
            sha,
            args.image_size,
            split.name,
            list(split.paths),
            compute,
            network_meta=network.meta,
            root=split.root,
            scales=args.multiscale,
            content_hash=args.hash_images,
        )
    else:
        embeddings = compute()
    if not dist.is_main:
        return 0
    description = {
        "embeddings": args.output.name,
        "split": split.name,
        "root": str(split.root),
        "image_size": args.image_size,
        "multiscale": list(args.multiscale),
        "multiscale_power": multiscale_power(network, args.multiscale),
        "precision": "bf16" if args.bf16 else "fp32",
        "network": str(checkpoint) if checkpoint is not None else args.network,
        "network_sha256": sha,
        "shape": list(embeddings.shape),
        "paths": list(split.paths),
        "labels": list(split.labels),
        "skipped_images": [{"path": b.path, "reason": b.reason} for b in bad],
    }
    write_pair(embeddings.numpy(), description, args.output, sidecar)
    logger.info("Wrote %s embeddings of %s to %s", tuple(embeddings.shape), split.name, args.output)
    return 0


def write_pair(array: np.ndarray, description: dict, output: Path, sidecar: Path) -> None:
    """Write the embeddings and their sidecar, each atomically: both are written in full to temporary files
    first, then the sidecar is renamed into place and the ``.npy`` last. A failure while writing leaves the
    previous pair as it was, and a new ``.npy`` never sits beside an old sidecar."""
    import numpy as np

    from raml.utils import atomic_path

    with atomic_path(output) as npy_tmp, atomic_path(sidecar) as json_tmp:
        with open(npy_tmp, "wb") as f:
            np.save(f, array)
        json_tmp.write_text(json.dumps(description, indent=2, sort_keys=False) + "\n")
    logger.debug("Wrote %s and %s", sidecar, output)
