"""``raml bench serve``: a tiny run of the whole benchmark (two real servers on loopback, concurrent clients).

One run (closed loop at 1 and 3 clients, open loop at 0.5x and 2x) serves every test of this module: starting the
two servers, the clients and the index is most of its cost."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from raml.cli import main as cli_main  # noqa: E402


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench_serve")
    out, png = tmp / "serve.json", tmp / "curve.png"
    argv = ["bench", "serve", "--work-dir", str(tmp / "work"), "--json", str(out), "--plot", str(png)]
    argv += ["--concurrency", "1,3", "--rates", "0.5,2", "--duration", "0.5", "--warmup", "0.2"]
    argv += ["--num-classes", "4", "--images-per-class", "2", "--architecture", "timm/test_resnet", "--whitening", "8"]
    # a 20 ms batching window (default 5): three clients in step land in one batch even on a loaded machine
    argv += ["--max-batch", "4", "--max-wait-ms", "20", "--open-connections", "8", "--client-processes", "1"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_main.main(argv) == 0
    return {"result": json.loads(out.read_text()), "table": printed.getvalue(), "png": png}


def test_bench_serve_reports_throughput_latency_and_errors_as_json_and_table(bench):
    result, table = bench["result"], bench["table"]
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


def test_bench_serve_open_loop_curve_goals_and_plot_with_a_client_that_was_not_the_limit(bench):
    """Structure of the open-loop curve, the goals and the PNG; on this small run the client was not the limit."""
    result, table = bench["result"], bench["table"]
    closed = {
        mode: [r["queries_per_s"] for r in result["runs"] if r["mode"] == mode] for mode in ("batched", "unbatched")
    }
    saturation = max(closed["batched"])  # the best batched closed-loop row
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
    for row in result["open_loop"]:  # where an answered request's time went, from the server's own timings
        assert 0 <= row["server_queue_p50_ms"] <= row["server_queue_p99_ms"] <= row["server_total_p99_ms"]
        assert 0 < row["server_decode_p50_ms"] <= row["server_decode_p99_ms"] <= row["server_total_p99_ms"]
    # the client was not the limit where the load is light: the closed loops of 1 and 3 clients, half the saturation
    light = result["runs"] + [r for r in result["open_loop"] if r["saturation_fraction"] == 0.5]
    assert [r["client_limited_because"] for r in light] == [[] for _ in light]
    goals = result["goals"]
    assert goals["saturation_ratio"] == pytest.approx(saturation / max(closed["unbatched"]))
    assert set(goals["at_2x"]) >= {"rejected_503", "shed_by_reason", "p99_ms", "bound_ms", "met"}
    # how much slower the server's forward pass ran at 2x than at saturation, and the load generator's cores
    best = max((r for r in result["runs"] if r["mode"] == "batched"), key=lambda r: r["queries_per_s"])
    at2x = next(r for r in result["open_loop"] if (r["mode"], r["saturation_fraction"]) == ("batched", 2.0))
    assert goals["at_2x"]["saturation_batch_service_ms"] == best["server_embed_p50_ms"]
    assert goals["at_2x"]["client_cpu_cores"] == at2x["client_cpu_cores"] > 0
    assert f"the client processes used {at2x['client_cpu_cores']:.2f} of the machine's" in table
    # where the cores went in each row: the server's event loop, its other threads, the whole machine (/proc)
    for row in result["runs"] + result["open_loop"]:
        loop, other, busy = row["server_loop_cores"], row["server_other_cores"], row["machine_busy_cores"]
        assert 0 < loop <= busy + 0.05 and 0 < other <= busy + 0.05
        assert busy <= result["machine"]["cores"] + 0.05
    for key in ("server_loop_cores", "server_other_cores", "machine_busy_cores"):
        assert goals["at_2x"][key] == at2x[key]
    assert f"the machine was {at2x['machine_busy_cores']:.2f} cores busy" in table
    assert "loop c" in table and "busy c" in table
    assert "at_80pct" not in goals
    for row in result["open_loop"]:  # the server's own count of the 503s in the window, by reason
        assert row["shed_by_reason"] is not None  # the probe got through
        assert all(isinstance(n, int) and n >= 0 for n in row["shed_by_reason"].values())
    assert "open loop (Poisson arrivals" in table and "open loop at 2x saturation" in table
    assert "dec p99" in table and "que p99" in table
    assert bench["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_health_polls_and_metrics_probes_of_a_server_share_one_client(monkeypatch, tmp_path):
    """``_Server`` polls ``/health`` and probes ``/metrics`` through one ``httpx.Client`` (a ``httpx.get`` per call
    built a client and its SSL context each time, ~23 ms of CPU), each request still on its own connection."""
    import http.server
    import threading

    import httpx

    from raml.bench import serve as bench_serve

    seen: list[tuple[str, int]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append((self.path, self.client_address[1]))
            if self.path == "/health":
                body = json.dumps({"ready": len(seen) >= 3}).encode()
            else:
                body = b'raml_shed_total{reason="queue_full"} 2.0\n'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    made: list[object] = []
    real_init = httpx.Client.__init__

    def counting_init(self, *args: object, **kwargs: object) -> None:  # every client, httpx.get's own included
        made.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(httpx.Client, "__init__", counting_init)
    monkeypatch.setattr(bench_serve.time, "sleep", lambda s: None)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = object.__new__(bench_serve._Server)
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    server.process = type("Running", (), {"poll": lambda self: None})()
    server._log = (tmp_path / "log").open("w")
    server.http = bench_serve.http_client()
    try:
        server.wait_ready()
        shed = [bench_serve._scrape_shed(server.http, server.url) for _ in range(2)]
    finally:
        server.http.close()
        server._log.close()
        httpd.shutdown()
    assert shed == [{"queue_full": 2.0}] * 2
    assert [path for path, _ in seen] == ["/health"] * 3 + ["/metrics"] * 2
    assert len({port for _, port in seen}) == 5  # a fresh connection per request, as before
    assert len(made) == 1


def _row(qps: float, cpu_share: float, rate: float | None = None, **extra: object) -> dict:
    """A summarised row of ``qps`` answers/s at 10 ms from one client process at ``cpu_share`` of a core (above 0.8:
    client-limited) on a 2-core machine."""
    from raml.bench.loadgen import LoadResult, summarise

    n = int(qps * 10)
    records = [
        (i / qps, i / qps, i / qps, i / qps + 0.01, 200, 10.0, 5.0, 1.0, False, 0.0, 1.0, 1.0, 0.1, 0.1)
        for i in range(n)
    ]
    row = summarise(LoadResult(records, (0.0, 10.0), [cpu_share], rate, 8, (None, None), 2))
    row.update(extra)
    return row


def test_goals_from_client_limited_rows_read_not_measured_and_the_flags_come_before_any_ratio():
    """The auditor's case: a client-limited batched row gave the saturation (and so every open-loop rate), and the
    goals read "met"; a flagged row is now left out of the saturation and the ratios, its goals have met None."""
    from raml.bench.serve import ServeBenchSettings, _goals, format_serve_report

    runs = [
        _row(400.0, 0.97, mode="batched", max_batch=32),  # client-limited: 97 % of a core
        _row(80.0, 0.30, mode="unbatched", max_batch=1),
    ]
    opened = [_row(400.0 * f, 0.95, 400.0 * f, mode="batched", max_batch=32, saturation_fraction=f) for f in (0.8, 2)]
    goals = _goals(runs, opened, ServeBenchSettings())
    assert goals["saturation_per_s"] == {"batched": None, "unbatched": 80.0}
    assert goals["saturation_ratio"] is None and goals["saturation_ratio_met"] is None
    assert goals["at_80pct"]["met"] is None and goals["at_2x"]["met"] is None
    # with a batched row that measured the server, the ratio is from it and the goal is measured
    runs.append(_row(340.0, 0.3, mode="batched", max_batch=32))
    opened = [_row(340.0 * f, 0.3, 340.0 * f, mode="batched", max_batch=32, saturation_fraction=f) for f in (0.8, 2)]
    goals = _goals(runs, opened, ServeBenchSettings())
    assert goals["saturation_per_s"]["batched"] == runs[2]["queries_per_s"] == pytest.approx(340.0, rel=0.01)
    assert goals["saturation_ratio"] == pytest.approx(340.0 / 80.0, rel=0.02)
    assert goals["saturation_ratio_met"] is True and goals["at_80pct"]["met"] is True
    # the report: the flag first, then the ratios; a goal not measured says so
    runs[0]["concurrency"] = runs[1]["concurrency"] = 8
    runs[2]["concurrency"] = 1
    result = {
        "settings": {**dataclasses.asdict(ServeBenchSettings()), "database_images": 8},
        "machine": {"cpu": "test", "cores": 2, "load_average": [0.0, 0.0, 0.0]},
        "runs": runs,
        "open_loop": [],
        "speedup_batched_over_unbatched": {"8": None},
        "goals": _goals(runs[:2], [], ServeBenchSettings()),
    }
    lines = format_serve_report(result).splitlines()
    flag = next(i for i, line in enumerate(lines) if line.startswith("CLIENT-LIMITED row (batched, 8 clients)"))
    ratio = next(i for i, line in enumerate(lines) if line.startswith("batched / unbatched throughput: 8 clients -"))
    assert flag < ratio
    assert "(goal >= 4x: not measured (client-limited))" in lines[ratio + 1]
