"""A shard's rows file is read only once its .npy header is checked against its size: a file whose SHA-256 record
matches but whose header declares far more rows than it holds is a damaged shard, not a huge allocation."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from numpy.lib import format as npy_format

from raml.deploy.shards import plan_shards


def test_a_rows_file_declaring_more_than_it_holds_is_a_damaged_shard(tmp_path) -> None:
    plan = plan_shards(tmp_path, ["a.jpg", "b.jpg"], ["1:1", "2:2"], "0" * 64, 32, shard_size=2)
    plan.write(0, np.ones((2, 8), np.float32))
    rows_file, record_file = plan.directory / "shard-000000.npy", plan.directory / "shard-000000.json"
    with open(rows_file, "wb") as handle:  # a 128-byte file declaring 10^11 rows (2.9 TiB)
        npy_format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 8)})
    record = json.loads(record_file.read_text())
    record["sha256"] = hashlib.sha256(rows_file.read_bytes()).hexdigest()
    record_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="Shard 0 .* is missing or damaged"):
        plan.read(0)
