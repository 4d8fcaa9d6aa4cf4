"""``raml`` entry point: one sub-command per job; each module under ``raml.cli`` adds its own parser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from raml import __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    from raml.data.images import ImageLoadError
    from raml.engine.trainer import NonFiniteLossError, TrainingInterrupted
    from raml.models.checkpoints import CheckpointError, DownloadError

    return (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        ImageLoadError,
        CheckpointError,
        DownloadError,
        NonFiniteLossError,
        TrainingInterrupted,
    )


def build_parser() -> argparse.ArgumentParser:
    from raml.cli import bench, check, data, demo, deploy, evaluate, extract, reproduce, serve, train

    parser = argparse.ArgumentParser(
        prog="raml",
        description="Resolution-asymmetric deep metric learning: teacher databases at a large resolution, "
        "student queries at a small one.",
    )
    parser.add_argument("--version", action="version", version=f"raml {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (demo, train, evaluate, extract, check, data, reproduce):
        module.add_parser(subparsers)
    deploy.add_parsers(subparsers)
    serve.add_parser(subparsers)
    bench.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen command; returns the exit status."""
    parser = build_parser()
    USER_ERRORS = _user_errors()
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        # Bad input (paths, names, files, settings): a clear message, not a traceback.
        if getattr(args, "verbose", False):
            raise
        print(f"raml {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
