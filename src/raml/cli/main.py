"""``raml`` entry point: one sub-command per job; each module under ``raml.cli`` adds its own parser.

A command's module (and what it imports: torch, torchvision, timm, numba, ...) is imported only when that
command is parsed: ``raml --help`` lists the commands from :data:`COMMANDS` alone, ``raml serve ...`` imports
``raml.cli.serve`` and nothing of the other commands. A child process started by a test or a benchmark
(``raml serve``, ``raml index``, torchrun ranks) so pays only for its own command's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from raml import __version__
from raml.cli.choices import METHOD_NAMES

#: command -> (module under ``raml.cli``, its function that adds the command's parser, the line ``raml --help``
#: shows). One module may add several commands (``deploy``: index, search, export): building one builds them all.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("demo", "add_parser", "generate data, train a teacher, distil a student, compare (the main job)"),
    "train": ("train", "add_parser", "train a teacher (sym) or distil a student ({modes})"),
    "test": ("evaluate", "add_parser", "symmetric / asymmetric retrieval test"),
    "extract": ("extract", "add_parser", "embed a dataset split and save the embeddings"),
    "check-data": ("check", "add_parser", "find missing, empty, truncated or unreadable images in dataset splits"),
    "data": ("data", "add_parser", "dataset utilities (synth, download)"),
    "reproduce": (
        "reproduce",
        "add_parser",
        "the paper's table row for one dataset: test the published networks, distil a student, compare",
    ),
    "index": ("deploy", "add_parsers", "embed a database with the teacher and build a faiss index"),
    "search": ("deploy", "add_parsers", "search an index with query images embedded by the student"),
    "export": ("deploy", "add_parsers", "export a network to ONNX / TorchScript with its preprocessing"),
    "serve": ("serve", "add_parser", "serve searches of an index over HTTP (JSON API and a web page)"),
    "bench": (
        "bench",
        "add_parser",
        "benchmarks (eval, extract, methods, pipeline, resolutions, query, quantization, index, serve, adaptive)",
    ),
}

_NOT_BUILT = object()


def _help_line(name: str) -> str:
    """``raml --help``'s line for ``name``. The train line's ``--mode`` names are those of the method registry
    when it is imported already (a plug-in's :func:`raml.engine.methods.register_method` has imported it, so
    the plug-in is listed), else its built-in names from :data:`raml.cli.choices.METHOD_NAMES`: listing the
    commands imports no torch."""
    line = COMMANDS[name][2]
    if name != "train":
        return line
    registry = sys.modules.get("raml.engine.methods")
    modes = list(registry.METHODS) if registry is not None else list(METHOD_NAMES)
    return line.format(modes=", ".join(mode for mode in modes if mode != "sym"))


class _CommandParsers(dict):
    """The sub-parsers by command name (argparse's ``choices`` of the command argument); a command's parser is
    built, i.e. its module imported, the first time it is looked up (parsing, ``choices["train"]``,
    ``choices.values()``)."""

    def __init__(self, build: Callable[[str], None]) -> None:
        super().__init__()
        self._build = build

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        if super().__getitem__(name) is _NOT_BUILT:
            self._build(name)
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def values(self) -> list[argparse.ArgumentParser]:  # type: ignore[override]
        return [self[name] for name in list(self)]

    def items(self) -> list[tuple[str, argparse.ArgumentParser]]:  # type: ignore[override]
        return [(name, self[name]) for name in list(self)]


class _LazyCommands(argparse._SubParsersAction):
    """argparse's sub-commands, each listed with its help line at once and built from its module on first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._name_parser_map = self.choices = _CommandParsers(self._build)

    def add_command(self, name: str, help: str) -> None:
        self._choices_actions.append(self._ChoicesPseudoAction(name, (), help))
        dict.__setitem__(self._name_parser_map, name, _NOT_BUILT)

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """Called by a command's module while it builds: its parser takes the listed command's place."""
        if dict.get(self._name_parser_map, name) is not _NOT_BUILT:
            raise ValueError(f"raml.cli: command {name!r} is not listed in raml.cli.main.COMMANDS")
        kwargs.pop("help", None)  # the line is COMMANDS's, listed already
        dict.__delitem__(self._name_parser_map, name)
        return super().add_parser(name, **kwargs)

    def _build(self, name: str) -> None:
        module, function, _ = COMMANDS[name]
        getattr(importlib.import_module(f"raml.cli.{module}"), function)(self)
        if dict.get(self._name_parser_map, name, _NOT_BUILT) is _NOT_BUILT:
            raise RuntimeError(f"raml.cli.{module}.{function} did not add the command {name!r}")


#: the library's errors that mean bad input, by defining module: reported as one line, not a traceback
_USER_ERROR_CLASSES = (
    ("raml.data.images", "ImageLoadError"),
    ("raml.engine.trainer", "NonFiniteLossError"),
    ("raml.engine.trainer", "TrainingInterrupted"),
    ("raml.models.checkpoints", "CheckpointError"),
    ("raml.errors", "DownloadError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean bad input (paths, names, files, settings). Only those of modules already
    imported: an error can only have been raised by its module, so none is imported here for a check (the
    training engine's classes would cost a command that never trains about a second of imports)."""
    loaded = (getattr(sys.modules[module], name) for module, name in _USER_ERROR_CLASSES if module in sys.modules)
    # every OSError: a folder where a file is expected, a permission, a full disk ... (FileNotFoundError and
    # FileExistsError among them): the operating system's message names the path
    return (ValueError, OSError, *loaded)


#: how a DataLoader worker's exception, raised again in the main process, carries the worker's traceback
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


def _message(error: BaseException) -> str:
    """What a user reads of ``error``: its message; for an error raised in a DataLoader worker (whose text holds
    the worker's whole traceback), the original message only, from its last ``Type: message`` line on."""
    text = str(error)
    if _WORKER_TRACEBACK not in text:
        return text
    tail = text.split(_WORKER_TRACEBACK, 1)[1]
    kind = type(error)
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        start = tail.rfind("\n" + prefix)
        if start >= 0:
            return tail[start + 1 + len(prefix) :].rstrip() + " (in a data loading worker)"
    return text.split("\n", 1)[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raml",
        description="Resolution-asymmetric deep metric learning: teacher databases at a large resolution, "
        "student queries at a small one.",
    )
    parser.add_argument("--version", action="version", version=f"raml {__version__}")
    parser.register("action", "lazy_commands", _LazyCommands)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, action="lazy_commands")
    for name in COMMANDS:
        subparsers.add_command(name, _help_line(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    try:
        return int(args.func(args) or 0)
    except SystemExit as stop:
        if isinstance(stop.code, str):  # a command's own refusal: its message, and status 2 as for any bad input
            print(stop.code, file=sys.stderr)
            stop.code = 2  # (Python would print the message and exit with 1); str(stop) is still the message
        raise
    except Exception as error:
        # Bad input (paths, names, files, settings): a clear message, not a traceback.
        if not isinstance(error, _user_errors()) or getattr(args, "verbose", False):
            raise
        print(f"raml {args.command}: error: {_message(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
