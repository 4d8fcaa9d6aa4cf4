"""Flags and conversions shared by several commands."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

# Shared with the benchmarks, so defined below the CLI; re-exported here for the commands.
from raml.entry import (  # noqa: F401
    MAX_SEED,
    MAX_THREADS,
    MAX_WORKERS,
    bounded_int,
    check_output_file,
    check_output_files,
    image_sizes_arg,
    positive_int,
    seed_int,
    setup_logging,
    threads_int,
    workers_int,
    write_json,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("raml")


def default_workers() -> int:
    """The reference uses 8 loader workers; never more than the cores this machine has."""
    return min(8, os.cpu_count() or 1)


WORKERS_HELP = "data loader workers (default: 8, the reference's, capped at this machine's CPU count: {})"


def parse_gpu_id(value: str) -> list[int]:
    """The reference's ``-g/--gpu-id``: a string of comma-separated GPU indices (``'0'``, ``'0,1'``)."""
    items = [item.strip() for item in str(value).split(",")]
    if not items or any(not item.isdigit() for item in items):
        raise argparse.ArgumentTypeError(
            f"--gpu-id expects GPU indices such as '0' or '0,1' (student, then teacher), got {value!r}"
        )
    return [int(item) for item in items]


def devices_from_gpu_id(gpu_id: str | None, device: str = "auto") -> tuple[torch.device, torch.device]:
    """Resolve the (student, teacher) devices once, at the entry point.

    The reference makes ``--gpu-id`` visible and puts the student on its first GPU and, when two are
    listed (``'0,1'``), the teacher on the second. Here the same string selects the GPUs directly. An
    explicit ``--device`` (not ``auto``) wins over ``--gpu-id``. Without CUDA, ``--gpu-id`` falls back to the
    CPU with a log line, so the reference's commands also run on a machine without a GPU.
    """
    import torch

    from raml.utils import select_device

    if device != "auto" or gpu_id is None:
        chosen = select_device(device)
        return chosen, chosen
    indices = parse_gpu_id(gpu_id)
    if not torch.cuda.is_available():
        logger.info("--gpu-id %s: no CUDA device is visible, running on the CPU.", gpu_id)
        cpu = torch.device("cpu")
        return cpu, cpu
    count = torch.cuda.device_count()
    bad = [i for i in indices if i >= count]
    if bad:
        raise ValueError(f"--gpu-id {gpu_id}: GPU {bad[0]} does not exist; this machine has {count} (0..{count - 1}).")
    student = torch.device("cuda", indices[0])
    teacher = torch.device("cuda", indices[1]) if len(indices) > 1 else student
    return student, teacher


def add_runtime_args(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--data-root", default="data", metavar="DATA_DIR", help="folder holding the datasets")
    group.add_argument(
        "--device", default="auto", help="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."
    )
    group.add_argument(
        "--workers",
        type=workers_int,
        default=default_workers(),
        metavar="N",
        help=f"data loader workers, 0 to {MAX_WORKERS} (default: 8 capped at this machine's CPU count)",
    )
    group.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N", help="images per batch")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    group.add_argument("--verbose", action="store_true", help="debug logging")


def optional_comma_list(value: str) -> list[str]:
    """Comma-separated names; an empty string gives an empty list."""
    return [item.strip() for item in value.split(",") if item.strip()]


def comma_list(value: str) -> list[str]:
    items = optional_comma_list(value)
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as 'cub-test,cars-test'")
    return items


def device_from_args(args: argparse.Namespace) -> torch.device:
    from raml.utils import select_device

    try:
        return select_device(args.device)
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"raml: error: {error}") from error


def add_bad_images_arg(parser: argparse.ArgumentParser, default: str | None = "error") -> None:
    """``--bad-images {error,skip}``: what to do with images that cannot be read (see raml.data.check)."""
    parser.add_argument(
        "--bad-images",
        choices=("error", "skip"),
        default=default,
        help="unreadable images: stop with the list of files (error, default) or leave them out (skip)",
    )
