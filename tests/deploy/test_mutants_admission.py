"""Hand-mutation round on raml.deploy.service.admission: the cases the other tests left open."""

from __future__ import annotations

from raml.deploy.service.admission import RecentQuantile


def test_recent_quantile_recomputes_exactly_every_few_observations():
    tracker = RecentQuantile(quantile=1.0, window=10, every=2)
    values = []
    for value in (1.0, 5.0, 7.0, 2.0, 9.0):
        tracker.add(value)
        values.append(tracker.value)
    # the first at once; then at the 2nd observation since (7.0 and 9.0), never in between
    assert values == [1.0, 1.0, 7.0, 7.0, 9.0]
