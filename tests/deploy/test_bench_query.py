"""``raml bench query``: query cost per resolution and search time per index type, on a tiny network."""

from __future__ import annotations

import json

import pytest
import torch

from raml.bench import query
from raml.models import build_network


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "query.json", tmp_path / "query.png"
    code = query.main(
        [
            "--network",
            "resnet18",
            "--not-pretrained",
            "--whitening",
            "16",
            "--sizes",
            "32,48",
            "--batch-size",
            "4",
            "--repeats",
            "1",
            "--database-size",
            "300",
            "--queries",
            "5",
            "--device",
            "cpu",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "GFLOPs" in table and "ms/query" in table and "ivfpq" in table
    result = json.loads(out.read_text())
    assert [r["image_size"] for r in result["resolutions"]] == [32, 48]
    small, large = result["resolutions"]
    assert large["gflops"] > 1.5 * small["gflops"]  # FLOPs grow with the image area
    assert small["params_m"] == pytest.approx(11.18, abs=0.05)  # resnet18 trunk + 512x16 whitening
    assert small["latency_ms_batch1"] > 0 and small["throughput_images_per_s"] > 0
    assert [r["index_type"] for r in result["search"]] == ["flat", "ivf", "hnsw", "ivfpq"]
    assert result["search"][0]["recall_at_k"] == 1.0  # flat is the exact reference
    assert all(0.0 <= r["recall_at_k"] <= 1.0 and r["ms_per_query"] > 0 for r in result["search"])
    assert result["dim"] == 16 and result["device"] == "cpu"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_library_function_without_search():
    network = build_network("timm/test_resnet", whitening=8, pretrained=False).eval()
    result = query.run_query_benchmark(network, [32], torch.device("cpu"), batch_size=2, index_types=[], repeats=1)
    assert result["search"] == [] and len(result["resolutions"]) == 1 and result["dim"] == 8
    with pytest.raises(ValueError, match="at least 8 px"):
        query.run_query_benchmark(network, [0], torch.device("cpu"))
    with pytest.raises(ValueError, match="Unknown index types"):
        query.run_query_benchmark(network, [32], torch.device("cpu"), index_types=["lsh"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sizes", "224,abc"], "comma-separated pixel sizes"),
        (["--sizes", "0"], "at least 8 px"),
        (["--index-types", "flat,lsh"], "unknown index types"),
        (["--plot", "x.txt"], "--plot must end in"),
        (["--database-size", "0"], "positive integer"),
    ],
)
def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "query.json"
    out.write_text("previous")
    with pytest.raises(SystemExit) as excinfo:
        query.main(["--network", "resnet18", "--not-pretrained", "--json", str(out), *flags])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err
    assert out.read_text() == "previous"
