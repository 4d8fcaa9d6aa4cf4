"""``raml bench index`` end to end on a tiny setting (slow: every ``raml index`` run is a fresh process)."""

from __future__ import annotations

import numpy as np
import pytest

from raml.bench.index import format_build_report, format_index_report, run_build_benchmark, run_index_benchmark
from raml.deploy import load_index


@pytest.mark.slow
def test_bench_index_reports_memory_rates_and_equal_outputs(tmp_path):
    report = run_index_benchmark(
        tmp_path, sizes=(4, 8), engines=("local",), image_size=32, shard_size=4, batch_size=4, train_size=4
    )
    assert [(r["engine"], r["images"], r["exit_code"]) for r in report["runs"]] == [("local", 4, 0), ("local", 8, 0)]
    for run in report["runs"]:
        assert run["peak_rss_mib"] > 0 and run["images_per_s"] == round(run["images"] / run["wall_s"], 1)
    small, large = (r["peak_rss_mib"] for r in report["runs"])
    assert report["peak_rss_ratio_largest_to_smallest"] == {"local": round(large / small, 3)}
    # the larger database extends the smaller one: the same images give the same rows
    a = np.asarray(load_index(tmp_path / "index-local-4").embeddings)
    b = np.asarray(load_index(tmp_path / "index-local-8").embeddings)
    np.testing.assert_array_equal(a, b[:4])
    assert "| local | 8 |" in format_index_report(report)


@pytest.mark.slow
def test_bench_index_build_part_compares_in_memory_and_on_disk_builds(tmp_path):
    report = run_build_benchmark(
        tmp_path, sizes=(3000,), dim=16, nlist=8, m=4, chunk_rows=500, part_rows=1000, train_size=1000, queries=20
    )
    assert [(r["mode"], r["vectors"], r["exit_code"]) for r in report["runs"]] == [
        ("memory", 3000, 0),
        ("disk", 3000, 0),
    ]
    assert report["equal_outputs"] == {"3000": {"ids_equal": True, "scores_equal": True}}
    for run in report["runs"]:
        assert run["peak_anon_mib"] >= run["baseline_anon_mib"] > 0 and run["ru_maxrss_mib"] > 0
        assert run["codes_mib"] == round(3000 * (4 + 8) / 2**20, 1)
    assert "| disk | 3000 |" in format_build_report(report)
    assert (tmp_path / "build-disk-3000" / "lists.ivfdata").is_file()


def test_cached_images_are_kept_apart_by_size_and_seed(tmp_path):
    """A rerun in the same --work-dir with another --image-size measured the images of the first run (the cache
    was keyed by the image's number only) while reporting the new size."""
    from PIL import Image

    from raml.bench.index import _write_images

    small = _write_images(tmp_path / "images", 3, 32)
    large = _write_images(tmp_path / "images", 3, 48)
    assert [Image.open(p).size for p in small] == [(32, 32)] * 3
    assert [Image.open(p).size for p in large] == [(48, 48)] * 3
    reseeded = _write_images(tmp_path / "images", 1, 32, seed=1)
    assert Image.open(reseeded[0]).tobytes() != Image.open(small[0]).tobytes()
    assert _write_images(tmp_path / "images", 3, 32) == small  # the cache is still used for the same settings
