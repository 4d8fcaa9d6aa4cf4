"""raml: resolution-asymmetric deep metric learning.

A database is embedded once, offline, by a heavy teacher network at a large image size; queries are
embedded online by a cheap student at a small size that was trained to land in the teacher's space.

Data flow: ``raml.data`` (splits, images -> tensors, coupled views) -> ``raml.models`` (backbone ->
pooling -> whitening -> L2-normalised embedding; checkpoints) -> ``raml.losses`` (embeddings -> scalar)
-> ``raml.engine`` (training) ; ``raml.retrieval`` (extraction, metrics, evaluation) ; ``raml.cli``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of a package whose names (``exports``: name -> the module that
    defines it) are imported on first use, so that importing one submodule, or a light command, does not import
    every other submodule's dependencies (torch, timm, faiss). A name once looked up becomes a plain attribute of
    ``package``.

    Use in a package's ``__init__``: ``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)``.
    """

    def __getattr__(name: str) -> object:
        home = exports.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        setattr(sys.modules[package], name, value)  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
