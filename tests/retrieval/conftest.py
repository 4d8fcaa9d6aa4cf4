"""Shared pieces of the retrieval tests: ``plain_metrics``, mAP and R@k written as plain loops."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest


def _plain_metrics(
    sims: np.ndarray, query_labels: list, database_labels: list, ks: tuple[int, ...], exclude_self: bool
) -> dict[str, float]:
    """mAP and R@k from a (Nq, Nd) similarity matrix: sort every row, negatives before positives on ties."""
    aps, hits, empty = [], dict.fromkeys(ks, 0), 0
    for i, row in enumerate(sims):
        items = [
            (-row[c], database_labels[c] == query_labels[i]) for c in range(len(row)) if not (exclude_self and c == i)
        ]
        items.sort()  # decreasing similarity; False (negative) sorts before True (positive) on a tie
        positives = [r for r, (_, is_pos) in enumerate(items) if is_pos]
        if not positives:
            empty += 1
            continue
        ap = 0.0
        for j, r in enumerate(positives):
            ap += ((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / 2 / len(positives)
        aps.append(ap)
        for k in ks:
            hits[k] += positives[0] < k
    out = {"mAP": 100 * sum(aps) / len(aps)}
    out.update({f"R@{k}": 100 * hits[k] / len(aps) for k in ks})
    out.update(num_queries=len(aps), num_no_positive=empty)
    return out


@pytest.fixture(scope="session")
def plain_metrics() -> Callable[..., dict[str, float]]:
    """``(sims (Nq, Nd), query_labels, database_labels, ks, exclude_self) -> {"mAP", "R@k", "num_queries",
    "num_no_positive"}``: every row sorted in a loop (the revisited Oxford/Paris ``compute_ap``, trapezoid rule;
    negatives before positives on ties), the independent check of :mod:`raml.retrieval.metrics`."""
    return _plain_metrics
