"""Retrieval: embeddings -> ranks -> metrics; extraction of embeddings; the test protocol."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names, for type checkers and tests/test_layering.py
    from raml.retrieval.metrics import average_precision, retrieval_metrics

# name -> the module that defines it; imported on first use (module __getattr__ below), so that importing
# one submodule (or a light command) does not import every other submodule's dependencies
_EXPORTS: dict[str, str] = {
    "average_precision": "raml.retrieval.metrics",
    "retrieval_metrics": "raml.retrieval.metrics",
}

__all__ = ["average_precision", "retrieval_metrics"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
