"""``raml bench serve``: a tiny run of the whole benchmark (two real servers on loopback, concurrent clients)."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from raml.cli import main as cli_main  # noqa: E402


def test_bench_serve_reports_throughput_latency_and_errors_as_json_and_table(tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--work-dir", str(tmp_path / "work"), "--json", str(out), "--concurrency", "1,3"]
    argv += ["--duration", "0.5", "--warmup", "0.1", "--num-classes", "4", "--images-per-class", "2"]
    # a 20 ms batching window (default 5): three clients in step land in one batch even on a loaded machine
    argv += ["--architecture", "timm/test_resnet", "--whitening", "8", "--max-batch", "4", "--max-wait-ms", "20"]
    assert cli_main.main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [(r["mode"], r["max_batch"], r["concurrency"]) for r in result["runs"]] == [
        ("batched", 4, 1),
        ("batched", 4, 3),
        ("unbatched", 1, 1),
        ("unbatched", 1, 3),
    ]
    assert result["errors"] == 0 and result["settings"]["database_images"] == 8
    for run in result["runs"]:
        assert run["queries"] > 0 and run["queries_per_s"] == pytest.approx(run["queries"] / run["seconds"])
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert 1.0 <= run["mean_batch"] <= run["max_batch"]
    assert [r["mean_batch"] for r in result["runs"] if r["mode"] == "unbatched"] == [1.0, 1.0]
    # the batched server really batches: three concurrent clients share forward passes (measured on /metrics; a
    # "batched" server started with --max-batch 1 failed here)
    batched_3 = next(r for r in result["runs"] if (r["mode"], r["concurrency"]) == ("batched", 3))
    assert batched_3["mean_batch"] > 1.0
    qps = {(r["mode"], r["concurrency"]): r["queries_per_s"] for r in result["runs"]}
    assert result["speedup_batched_over_unbatched"]["3"] == pytest.approx(qps["batched", 3] / qps["unbatched", 3])
    assert "p99 ms" in table and "batched / unbatched throughput: 1 clients" in table
    rows = [line.split()[:3] for line in table.splitlines() if re.match(r"(un)?batched +\d", line)]
    expected = [["batched", "4", "1"], ["batched", "4", "3"], ["unbatched", "1", "1"], ["unbatched", "1", "3"]]
    assert rows == expected
