"""Hand-mutation survivors of raml.deploy.shards, now killed: the shape and dtype check of a shard's rows, a
resume that would take another job's finished shard although its own is there, and the adoption of a record
whose key matches but whose paths do not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raml.deploy.shards import ShardPlan, plan_shards
from raml.utils import atomic_numpy_save, file_sha256


def _fill(plan: ShardPlan, value: float = 1.0) -> None:
    for i in plan.missing():
        plan.write(i, np.full((len(plan.shard_paths(i)), 3), value, np.float32))


def test_a_shard_whose_rows_disagree_with_its_record_is_refused_even_with_a_matching_checksum(tmp_path: Path):
    plan = plan_shards(tmp_path, ["a.jpg", "b.jpg"], ["1:1", "2:2"], "abc", 32, shard_size=2)
    _fill(plan)
    rows_file, record_file = plan.directory / "shard-000000.npy", plan.directory / "shard-000000.json"
    # float64 rows of the right shape, the record's checksum updated to match them: not float32, refused
    atomic_numpy_save(np.ones((2, 3), np.float64), rows_file)
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "sha256": file_sha256(rows_file)}))
    with pytest.raises(ValueError, match="float64"):
        plan.read(0)
    # float32 rows of another width than the record's
    atomic_numpy_save(np.ones((2, 5), np.float32), rows_file)
    record_file.write_text(json.dumps({**record, "sha256": file_sha256(rows_file)}))
    with pytest.raises(ValueError, match="not its record's"):
        plan.read(0)


def test_resuming_a_job_whose_shards_are_all_there_takes_nothing_from_another_job(tmp_path: Path):
    """Two pending jobs share their first shard (same paths, stamps and settings). Planning one again must not
    move the other's copy of it into its folder: its own shard is there, and the other job would recompute it."""
    paths, stamps = [f"img{i}.jpg" for i in range(4)], [f"{i}:1" for i in range(4)]
    first = plan_shards(tmp_path, paths, stamps, "abc", 32, shard_size=2)
    _fill(first)
    second = plan_shards(tmp_path, paths[:2] + ["x.jpg"], stamps[:2] + ["9:9"], "abc", 32, shard_size=2)
    assert second.missing() == [1]  # its shard 0 moved in from the first job
    _fill(second)
    assert first.missing() == [0]
    _fill(first)  # the first job recomputes its shard 0: both jobs are complete now
    again = plan_shards(tmp_path, paths, stamps, "abc", 32, shard_size=2)  # a resume of the first job
    assert again.directory == first.directory and again.missing() == []
    assert second.missing() == []  # the second job's shard 0 stayed where it was


def test_a_record_whose_key_matches_but_whose_paths_differ_is_not_adopted(tmp_path: Path):
    paths, stamps = ["a.jpg", "b.jpg", "c.jpg"], ["1:1", "2:2", "3:3"]
    earlier = plan_shards(tmp_path, paths, stamps, "abc", 32, shard_size=2)
    _fill(earlier)
    # the record of its shard 0 edited to name other paths, its key kept
    record_file = earlier.directory / "shard-000000.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "paths": ["other.jpg", "b.jpg"]}))
    later = plan_shards(tmp_path, paths[:2], stamps[:2], "abc", 32, shard_size=2)  # c.jpg taken out
    assert later.missing() == [0]
    assert not (later.directory / "shard-000000.npy").exists()  # nothing moved in
    assert record_file.is_file() and (earlier.directory / "shard-000000.npy").is_file()  # left where it was
