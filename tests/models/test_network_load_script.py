"""benchmarks/network_load.py: one architecture, one repeat: both paths timed, the same weights, a ratio."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "network_load.py"


def test_the_benchmark_times_both_loads_of_the_same_weights(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("network_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "load.json"
    argv = ["--architectures", "test_resnet", "--repeats", "1", "--whitening", "8", "--json", str(out)]
    assert module.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["architecture"] == "test_resnet" and row["identical"] is True
    assert row["baseline_ms"] > 0 and row["raml_ms"] > 0
    assert row["ratio"] == pytest.approx(row["baseline_ms"] / row["raml_ms"])
    assert "test_resnet" in capsys.readouterr().out
