"""``raml bench adaptive``: a tiny run of the whole benchmark (a fixed and an adaptive server on loopback)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("faiss")

from raml.bench.adaptive import _read_counters, counter_deltas, served_map, size_shares  # noqa: E402
from raml.cli import main as cli_main  # noqa: E402


def test_size_shares_and_served_map_against_plain_arithmetic():
    before, after = {16: 2.0, 24: 10.0}, {16: 8.0, 24: 12.0, 32: 0.0}
    shares = size_shares(before, after)  # 6 queries at 16 px, 2 at 24 px in between
    assert shares == pytest.approx({16: 0.75, 24: 0.25})
    assert served_map(shares, {16: 40.0, 24: 60.0, 32: 70.0}) == pytest.approx(0.75 * 40.0 + 0.25 * 60.0)
    assert size_shares(after, after) == {} and served_map({}, {16: 1.0}) is None


class _Metrics:
    """A server whose ``/metrics`` answers ``text``."""

    def __init__(self, text: str, status: int = 200) -> None:
        self.text, self.status_code = text, status

    def get(self, route: str) -> _Metrics:
        assert route == "/metrics"
        return self


def test_counters_read_from_metrics_and_their_growth():
    text = (
        "# HELP raml_queries_total ...\n"
        'raml_queries_total{size="24"} 12.0\n'
        'raml_queries_total{size="48"} 3.0\n'
        'raml_shed_total{reason="queue_wait"} 7.0\n'
        'raml_shed_total{reason="decodes"} 1.0\n'
        'raml_requests_total{route="search",status="503"} 8.0\n'
        "raml_late_answers_total 2.0\n"
    )
    assert _read_counters(_Metrics(text)) == ({24: 12.0, 48: 3.0}, {"queue_wait": 7.0, "decodes": 1.0}, 2.0)
    assert _read_counters(_Metrics('raml_queries_total{size="24"} 1.0\n'))[2] == 0.0  # none: an older server
    assert _read_counters(_Metrics("", status=500), attempts=2) is None
    before, after = {"queue_wait": 7.0, "decodes": 1.0}, {"queue_wait": 10.0, "decodes": 1.0, "uploads": 2.0}
    assert counter_deltas(before, after) == {"queue_wait": 3, "uploads": 2}  # only those that grew
    assert counter_deltas(None, after) == {} and counter_deltas(after, after) == {}


@pytest.mark.slow
def test_bench_adaptive_quick_rows_shares_served_map_goal_and_plot(tmp_path, capsys):
    out, png = tmp_path / "adaptive.json", tmp_path / "adaptive.png"
    argv = ["bench", "adaptive", "--quick", "--work-dir", str(tmp_path / "work"), "--json", str(out)]
    assert cli_main.main([*argv, "--plot", str(png), "--server-arg=--eager"]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["sizes"] == [16, 24] and set(result["asym_mAP"]) == {"16", "24"}
    assert all(0.0 <= v <= 100.0 for v in result["asym_mAP"].values())
    assert result["saturation"]["queries_per_s"] > 0
    assert [(r["server"], r["saturation_fraction"]) for r in result["rows"]] == [
        ("fixed", 1.0),
        ("fixed", 2.0),
        ("adaptive", 1.0),
        ("adaptive", 2.0),
    ]
    saturation = result["saturation"]["queries_per_s"]
    maps = {int(s): v for s, v in result["asym_mAP"].items()}
    for row in result["rows"]:
        assert row["offered_per_s"] == pytest.approx(row["saturation_fraction"] * saturation)
        assert row["queries"] > 0 and row["errors"] == 0
        shares = {int(s): v for s, v in row["size_share"].items()}
        assert sum(shares.values()) == pytest.approx(1.0)
        assert row["served_mAP"] == pytest.approx(sum(v * maps[s] for s, v in shares.items()))
        if row["server"] == "fixed":  # every query at the largest size
            assert shares == {24: pytest.approx(1.0)}
        assert "client_limited" in row
        assert all(isinstance(n, int) and n > 0 for n in row["shed_by_reason"].values())
        assert row["late_answers"] >= 0 and (row["server"] == "adaptive" or row["late_answers"] == 0)
        # where the cores went (raml.bench.cpu): the server's event loop, its other threads, the machine
        assert 0 < row["server_loop_cores"] <= row["machine_busy_cores"] + 0.05
        assert 0 < row["server_other_cores"] <= row["machine_busy_cores"] + 0.05
    target = result["settings"]["target_ms"]
    fixed_first = result["rows"][0]
    assert result["settings"]["target_derived"] and target == pytest.approx(2.0 * fixed_first["p99_ms"], abs=0.05)
    assert result["goals"]["target_ms"] == target and "met" in result["goals"]["at_2x"]
    assert "served mAP" in table and "at 2x saturation" in table and "loop c  wrk c busy c" in table
    assert png.stat().st_size > 10_000
    # --server-arg reaches both servers: --eager, so neither traced its network
    assert result["settings"]["server_args"] == ["--eager"]
    for log in ("serve-fixed.log", "serve-adaptive.log"):
        text = (tmp_path / "work" / log).read_text()
        assert "Serving" in text and "traced" not in text


def test_the_goal_at_2x_is_not_measured_when_a_row_behind_it_was_client_limited():
    from raml.bench.adaptive import _goals

    def row(server: str, p99: float, shed: int, limited: bool) -> dict:
        return {"server": server, "saturation_fraction": 2.0, "p99_ms": p99, "rejected_503": shed, "errors": 0,
                "served_mAP": 50.0, "client_limited": limited}  # fmt: skip

    met = [row("adaptive", 40.0, 0, False), row("fixed", 90.0, 12, False)]
    assert _goals(met, 50.0)["at_2x"]["met"] is True
    assert _goals(met, 50.0, saturation_limited=True)["at_2x"]["met"] is None  # the rates came from a flagged row
    assert _goals([row("adaptive", 40.0, 0, True), met[1]], 50.0)["at_2x"]["met"] is None
    assert _goals([met[0], row("fixed", 90.0, 12, True)], 50.0)["at_2x"]["met"] is None


def test_a_target_derived_from_a_client_limited_row_makes_the_goal_not_measured():
    from raml.bench.adaptive import derived_target

    def row(p99: float | None, limited: bool) -> dict:
        return {"p99_ms": p99, "client_limited": limited, "client_limited_because": ["a client at 95 % of a core"]}

    assert derived_target(None, [row(None, False), row(20.0, False)]) == (40.0, False)  # the first that answered
    assert derived_target(None, [row(20.0, True), row(30.0, False)]) == (40.0, True)
    assert derived_target(80.0, [row(20.0, True)]) == (80.0, False)  # --target-ms: nothing derived
    with pytest.raises(RuntimeError, match="no latency target"):
        derived_target(None, [row(None, False)])
