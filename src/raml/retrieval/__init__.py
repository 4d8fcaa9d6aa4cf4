"""Retrieval: embeddings -> ranks -> metrics; extraction of embeddings; the test protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raml import lazy_exports

if TYPE_CHECKING:  # the names, for type checkers and tests/test_layering.py
    from raml.retrieval.metrics import average_precision, retrieval_metrics

# name -> the module that defines it; imported on first use (module __getattr__ below), so that importing
# one submodule (or a light command) does not import every other submodule's dependencies
_EXPORTS: dict[str, str] = {
    "average_precision": "raml.retrieval.metrics",
    "retrieval_metrics": "raml.retrieval.metrics",
}

__all__ = ["average_precision", "retrieval_metrics"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
