"""``raml bench pipeline`` times numba's first call (compile or cache load) once, apart from the timed runs."""

from __future__ import annotations

import time

import raml.bench.pipeline as pipeline


def test_first_call_is_timed_once_before_the_runs_and_reported(tmp_path, monkeypatch):
    events: list[str] = []

    def slow_warm_up() -> None:  # stands in for a compile: 0.2 s of CPU
        events.append("warm_up")
        stop = time.process_time() + 0.2
        while time.process_time() < stop:
            pass

    timed = pipeline._time_loader

    def recording_time_loader(*args, **kwargs):
        events.append("run")
        return timed(*args, **kwargs)

    monkeypatch.setattr(pipeline, "warm_up", slow_warm_up)
    monkeypatch.setattr(pipeline, "_time_loader", recording_time_loader)
    jpegs = pipeline.make_synthetic_jpegs(tmp_path / "imgs", 3, width=40, height=30)
    report = pipeline.run_pipeline_benchmark(jpegs, 16, 32, pos_num=2, batch_size=2, workers=0, batches=1)
    assert events[0] == "warm_up" and events.count("warm_up") == 1 and events.count("run") == 4
    first = report["jit_first_call"]
    assert first["cpu_seconds"] >= 0.19 and first["seconds"] >= first["cpu_seconds"] * 0.5
    assert "not in the timed runs" in first["note"]
    # the rates come from the timed runs alone
    faithful = report["modes"]["faithful"]
    best = max(run["coupled_views"] / run["cpu_seconds"] for run in faithful["runs"])
    assert faithful["coupled_views_per_cpu_s"] == best
