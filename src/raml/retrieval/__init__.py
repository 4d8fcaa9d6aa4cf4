"""Retrieval: embeddings -> ranks -> metrics; extraction of embeddings; the test protocol."""

from raml.retrieval.metrics import average_precision, retrieval_metrics

__all__ = ["average_precision", "retrieval_metrics"]
