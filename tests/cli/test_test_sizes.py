"""``raml test --image-size 24,32``: one row and one JSON entry per query size, each equal to the single-size
test at that size, the teacher's database embedded once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raml.cli.main import main
from raml.data.splits import get_split
from raml.models import load_network
from raml.models.cost import gflops_per_image
from raml.retrieval import sizes as sizes_module
from raml.retrieval.evaluate import evaluate_split
from raml.retrieval.sizes import DatabaseOnce, evaluate_sizes

ARCH = "timm/test_resnet"
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_same(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> None:
    assert set(a) == set(b)
    for test in a:
        assert a[test] == pytest.approx(b[test])


@pytest.fixture(scope="module")
def networks(random_network) -> dict[str, Path]:
    """Random 8-d teacher and student (seeds 0 and 1), shared by the session (the tests only read them)."""
    return {"teacher": random_network(ARCH, 8, 0), "student": random_network(ARCH, 8, 1)}


def test_each_size_is_the_single_size_test_and_the_database_is_embedded_once(own_root, networks, monkeypatch):
    student, teacher = load_network(networks["student"]), load_network(networks["teacher"])
    split = get_split("mine-test", own_root)
    calls = []
    real = sizes_module.extract_embeddings
    monkeypatch.setattr(
        sizes_module, "extract_embeddings", lambda net, *a, **k: calls.append(net is teacher) or real(net, *a, **k)
    )
    embed = DatabaseOnce(teacher)
    entries = evaluate_sizes(
        student, [split], [24, 32], CPU, teacher=teacher, teacher_image_size=40, sym=True, progress=False, embed=embed
    )
    assert [e["image_size"] for e in entries] == [24, 32]
    assert calls.count(True) == 1 and embed.calls == 1  # two sizes, one database
    for entry in entries:
        single = evaluate_split(
            student, split, entry["image_size"], CPU, teacher=teacher, teacher_image_size=40, sym=True, progress=False
        )
        _assert_same(entry["results"]["mine-test"], single)
        assert entry["query_gflops"] == pytest.approx(gflops_per_image(student, entry["image_size"]))
    assert entries[0]["query_gflops"] < entries[1]["query_gflops"]


def test_raml_test_prints_and_writes_one_entry_per_size(own_root, networks, tmp_path, capsys):
    out = tmp_path / "sizes.json"
    argv = ["test", "-d", "mine-test", "--data-root", str(own_root), "--sym", "--no-progress", "-j", "0"]
    argv += ["--student-path", str(networks["student"]), "--teacher-path", str(networks["teacher"])]
    code = main([*argv, "--image-size", "24,32", "--teacher-image-size", "40", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "asym mAP" in printed and "query GFLOPs" in printed
    rows = [
        line.split() for line in printed.splitlines() if line.split()[:2] in (["24", "mine-test"], ["32", "mine-test"])
    ]
    assert len(rows) == 2
    result = json.loads(out.read_text())
    assert [e["image_size"] for e in result["sizes"]] == [24, 32]
    for entry in result["sizes"]:
        tests = entry["results"]["mine-test"]
        assert set(tests) == {"asym", "sym"} and entry["query_gflops"] > 0
        assert tests["asym"]["num_skipped_images"] == 0
    # a single size keeps the single-size output
    single = tmp_path / "single.json"
    assert main([*argv, "--image-size", "32", "--teacher-image-size", "40", "--json", str(single)]) == 0
    _assert_same(json.loads(single.read_text())["mine-test"], result["sizes"][1]["results"]["mine-test"])


def test_index_with_several_sizes_is_refused(own_root, networks, tmp_path):
    argv = ["test", "-d", "mine-test", "--data-root", str(own_root), "--student-path", str(networks["student"])]
    with pytest.raises(SystemExit, match="one query size at a time"):
        main([*argv, "--index", str(tmp_path), "--image-size", "24,32"])
