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


def test_bench_serve_open_loop_curve_goals_and_plot_with_a_client_that_was_not_the_limit(tmp_path, capsys):
    """Structure of the open-loop curve, the goals and the PNG; on this small run the client was not the limit."""
    out, png = tmp_path / "serve.json", tmp_path / "curve.png"
    argv = ["bench", "serve", "--work-dir", str(tmp_path / "work"), "--json", str(out), "--plot", str(png)]
    argv += ["--concurrency", "2", "--rates", "0.5,2", "--duration", "1.0", "--warmup", "0.3", "--num-classes", "4"]
    argv += ["--images-per-class", "2", "--architecture", "timm/test_resnet", "--whitening", "8", "--max-batch", "4"]
    argv += ["--open-connections", "8", "--client-processes", "1"]
    assert cli_main.main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    saturation = result["runs"][0]["queries_per_s"]  # the only batched closed-loop row
    assert result["goals"]["saturation_per_s"]["batched"] == saturation
    opened = [(r["mode"], r["saturation_fraction"], r["offered_per_s"]) for r in result["open_loop"]]
    assert opened == [
        ("batched", 0.5, pytest.approx(0.5 * saturation)),
        ("batched", 2.0, pytest.approx(2.0 * saturation)),
        ("unbatched", 0.5, pytest.approx(0.5 * saturation)),
        ("unbatched", 2.0, pytest.approx(2.0 * saturation)),
    ]
    for row in result["runs"] + result["open_loop"]:
        assert row["errors"] == 0 and row["queries"] > 0
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["server_total_p99_ms"] > 0 and row["client_lag_p99_ms"] >= 0
        assert row["rejected_without_retry_after"] == 0
    # the client was not the limit where the load is light: a closed loop of 2 clients and half the saturation rate
    light = result["runs"] + [r for r in result["open_loop"] if r["saturation_fraction"] == 0.5]
    assert [r["client_limited_because"] for r in light] == [[] for _ in light]
    goals = result["goals"]
    assert goals["saturation_ratio"] == pytest.approx(saturation / result["runs"][1]["queries_per_s"])
    assert set(goals["at_2x"]) >= {"rejected_503", "shed_by_reason", "p99_ms", "bound_ms", "met"}
    assert "at_80pct" not in goals
    for row in result["open_loop"]:  # the server's own count of the 503s in the window, by reason
        assert row["shed_by_reason"] is not None  # the probe got through
        assert all(isinstance(n, int) and n >= 0 for n in row["shed_by_reason"].values())
    assert "open loop (Poisson arrivals" in table and "open loop at 2x saturation" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
