"""A reduced ``raml demo`` (few images, one epoch each, a tiny backbone) writes every artefact."""

from __future__ import annotations

import json
from pathlib import Path

from raml.cli.main import main

KEYS = {
    "setting",
    "query_network",
    "query_size",
    "database_network",
    "database_size",
    "mAP",
    "R@1",
    "R@4",
    "query_gflops",
    "query_ms",
}


def test_reduced_demo_writes_every_artefact(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--classes",
            "8",
            "--images-per-class",
            "6",
            "--teacher-epochs",
            "1",
            "--student-epochs",
            "1",
            "--architecture",
            "test_resnet",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 5
    for row in rows:
        assert set(row) == KEYS
        assert row["query_network"] in {"teacher", "student"} and row["database_network"] in {"teacher", "student"}
        assert 0 <= row["mAP"] <= 100 and row["query_gflops"] > 0 and row["query_ms"] > 0
    # queries at QR cost about (QR/DR)^2 of queries at DR for the same architecture
    ratio = rows[4]["query_gflops"] / rows[0]["query_gflops"]
    assert 0.15 < ratio < 0.4
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    assert "student QR / teacher DR" in markdown and "Distillation lifts" in markdown
    assert "Distillation lifts" in capsys.readouterr().out
    assert (out / "teacher" / "model_best.pth.tar").is_file() and (out / "student" / "model_best.pth.tar").is_file()
