"""Flags shared by ``raml test`` and ``raml extract``, with the reference's spellings, and how they become
typed values: ``--student-path NETWORK | --student ARCH`` style network pairs, ``-p/--pool``,
``-w/--whitening``, ``-ms/--multiscale``, ``-g/--gpu-id`` and the runtime flags (``-j/--workers``, ...)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from raml.cli.choices import POOLING_NAMES as POOLINGS
from raml.cli.common import WORKERS_HELP, default_workers, parse_gpu_id, positive_int, workers_int
from raml.entry import DEFAULT_POOL, DEFAULT_WHITENING, non_negative_int
from raml.retrieval.scales import parse_scales


def scales_arg(value: str) -> tuple[float, ...]:
    """argparse type of ``-ms/--multiscale``: the reference's list syntax, parsed without ``eval``."""
    try:
        return parse_scales(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{error}. Expected a list of positive scales such as '[1]' or '[1, 1/2**(1/2), 1/2]'."
        ) from None


def gpu_id_arg(value: str) -> str:
    """argparse type of ``-g/--gpu-id``: checked at parse time, kept as the reference's string (``'0,1'``)."""
    parse_gpu_id(value)
    return value.strip()


def add_model_hint_args(parser: argparse.ArgumentParser) -> None:
    """``-p/--pool`` and ``-w/--whitening``: how ARCH networks are built, and hints for old checkpoints."""
    parser.add_argument(
        "-p",
        "--pool",
        choices=sorted(POOLINGS),
        default=None,
        metavar="POOL",
        help=f"pooling of a network built from an architecture name (ARCH), and of a checkpoint without 'meta': "
        f"{' | '.join(sorted(POOLINGS))} (default: {DEFAULT_POOL}; a checkpoint's own meta wins)",
    )
    parser.add_argument(
        "-w",
        "--whitening",
        type=non_negative_int,
        default=None,
        metavar="DIM",
        help=f"whitening output dimension of a network built from ARCH, and of a checkpoint without 'meta'; "
        f"0 = none (default: {DEFAULT_WHITENING}; a checkpoint's own meta wins)",
    )


def add_multiscale_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-ms",
        "--multiscale",
        type=scales_arg,
        default="[1]",
        metavar="MULTISCALE",
        help="scales of the query embeddings (the database stays single-scale), e.g. '[1]' | "
        "'[1, 1/2**(1/2), 1/2]' | '[1, 2**(1/2), 1/2**(1/2)]'; numbers and + - * / ** only (default: '[1]')",
    )


def check_multiscale_size(command: str, scales: Sequence[float], image_size: int) -> None:
    """Refuse, before any work, a ``--multiscale`` scale that enlarges the ``image_size`` images past the pixel
    limit of an image (:data:`raml.data.image_limits.DEFAULT_MAX_PIXELS`): one line naming the flag, exit 2."""
    from raml.data.image_limits import DEFAULT_MAX_PIXELS
    from raml.retrieval.scales import check_scaled_size

    try:
        check_scaled_size(scales, image_size, DEFAULT_MAX_PIXELS)
    except ValueError as error:
        raise SystemExit(f"{command}: --multiscale: {error}.") from None


def add_runtime_args(
    parser: argparse.ArgumentParser, batch_size: int = 32, gpu_help: str = "GPU ids, e.g. '0' (default: '0')"
) -> None:
    """The runtime flags of ``raml.cli.common.add_runtime_args`` plus the reference's ``-j`` and ``-g/--gpu-id``."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--data-root", default="data", metavar="DATA_DIR", help="folder holding the datasets")
    group.add_argument(
        "--device",
        default="auto",
        help="'auto' (the --gpu-id GPUs when CUDA is present, else the CPU), 'cpu', 'cuda', 'cuda:1', ...; "
        "anything but 'auto' overrides --gpu-id",
    )
    group.add_argument("-g", "--gpu-id", type=gpu_id_arg, default="0", metavar="N", help=gpu_help)
    group.add_argument(
        "-j",
        "--workers",
        type=workers_int,
        default=default_workers(),
        metavar="N",
        help=WORKERS_HELP.format(os.cpu_count() or 1),
    )
    group.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N", help="images per batch")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    group.add_argument("--verbose", action="store_true", help="debug logging")
    group.add_argument(
        "--hash-images",
        action="store_true",
        help="key cached embeddings by each image's content (SHA-256) instead of its size and modification "
        "time: also sees a same-size rewrite that kept the old time, at the cost of reading every image",
    )
