"""The demo's one-sentence summary says what its table shows: a gain, a loss or no change."""

from __future__ import annotations

from typing import Any

import pytest

from raml.demo import summary


def _rows(baseline_map: float, method_map: float) -> list[dict[str, Any]]:
    teacher = {"mAP": 40.0, "query_size": 64, "database_size": 64, "query_gflops": 0.6}
    other = {"mAP": 30.0, "query_size": 32, "database_size": 64, "query_gflops": 0.15}
    baseline = {"mAP": baseline_map, "query_size": 32, "database_size": 64, "query_gflops": 0.15}
    method = {"mAP": method_map, "query_size": 32, "database_size": 64, "query_gflops": 0.15}
    return [teacher, other, baseline, other, method]


@pytest.mark.parametrize(
    ("baseline", "method", "says"),
    [
        (9.6, 20.3, "Distillation lifts asymmetric retrieval (queries at 32 px against the teacher's 64 px database) "
         "from 9.6 to 20.3 mAP, against 40.0 for the teacher at 64 px on both sides, at 0.25x the teacher's query "
         "FLOPs."),
        (20.3, 9.6, "Distillation lowers asymmetric retrieval (queries at 32 px against the teacher's 64 px database) "
         "from 20.3 to 9.6 mAP,"),
        (12.34, 12.31, "Distillation leaves asymmetric retrieval (queries at 32 px against the teacher's 64 px "
         "database) unchanged at 12.3 mAP,"),  # equal as printed
    ],
)  # fmt: skip
def test_the_verb_follows_the_sign_of_the_change(baseline: float, method: float, says: str) -> None:
    assert summary(_rows(baseline, method)).startswith(says)
