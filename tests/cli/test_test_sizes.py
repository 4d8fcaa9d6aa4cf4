"""``raml test --image-size 24,32``: one row and one JSON entry per query size, each equal to the single-size
test at that size, the teacher's database embedded once."""

from __future__ import annotations

import json
import logging
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


def test_raml_test_defaults_to_the_student_s_first_trained_size_and_warns_outside_them(
    own_root, networks, tmp_path, monkeypatch, caplog
):
    """A student trained at 24,32 (meta["image_sizes"]) is tested at 24 when --image-size is not given (before:
    224, a size it never saw); a size outside its list is tested with a warning."""
    from raml.cli import evaluate as evaluate_module
    from raml.models import save_checkpoint

    network = load_network(networks["student"])
    network.meta["image_sizes"] = [24, 32]
    student = tmp_path / "multi.pth"
    save_checkpoint(student, network)
    seen = []

    def recording(net, split, image_size, *args, **kwargs):
        seen.append(image_size)
        return evaluate_split(net, split, image_size, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_split", recording)
    argv = ["test", "-d", "mine-test", "--data-root", str(own_root), "--sym", "--no-progress", "-j", "0"]
    argv += ["--student-path", str(student), "--cpu-runtime", "torch"]
    assert main(argv) == 0
    assert seen == [24]
    search_logger = logging.getLogger("raml.deploy.search")
    search_logger.addHandler(caplog.handler)  # the CLI replaces the root logger's handlers
    try:
        assert main([*argv, "--image-size", "40"]) == 0
    finally:
        search_logger.removeHandler(caplog.handler)
    assert seen == [24, 40]
    assert "trained for query sizes [24, 32]; 40 px queries are outside them" in caplog.text
