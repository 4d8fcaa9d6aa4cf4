"""``raml test``, ``raml extract`` and the ``python test.py`` shim on tiny on-disk datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raml.cli.main import main
from raml.models import build_network, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def networks(tmp_path: Path) -> dict[str, Path]:
    """A 16-d 'teacher', a 16-d 'student' and an 8-d network, resnet18 with random weights."""
    out = {}
    for name, dim, seed in (("teacher", 16, 0), ("student", 16, 1), ("narrow", 8, 2)):
        import torch

        torch.manual_seed(seed)
        path = tmp_path / "nets" / f"{name}.pth"
        save_checkpoint(path, build_network("resnet18", whitening=dim, pretrained=False))
        out[name] = path
    return out


def test_raml_test_writes_json_for_asym_and_sym(cub_root: Path, networks, tmp_path: Path, capsys):
    out = tmp_path / "results.json"
    code = main(
        [
            "test",
            "--datasets",
            "cub-test",
            "--data-root",
            str(cub_root),
            "--sym",
            "--student-path",
            str(networks["student"]),
            "--teacher-path",
            str(networks["teacher"]),
            "--image-size",
            "32",
            "--teacher-image-size",
            "48",
            "--workers",
            "0",
            "--json",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results) == {"cub-test"}
    assert set(results["cub-test"]) == {"asym", "sym"}
    for metrics in results["cub-test"].values():
        assert {"mAP", "R@1", "R@2", "R@4", "R@8"} <= set(metrics)
        assert 0.0 <= metrics["mAP"] <= 100.0
        assert metrics["num_queries"] == 200  # 100 test classes x 2 images
    table = capsys.readouterr().out
    assert "cub-test" in table and "asym" in table and "mAP" in table
    # the teacher's database side was cached under its content hash
    assert len(list((cub_root / "cache" / "embeddings").glob("*.npy"))) == 1


def test_dimension_mismatch_is_refused_before_any_extraction(cub_root: Path, networks, tmp_path: Path, capsys):
    out = tmp_path / "results.json"
    out.write_text("previous results")
    code = main(
        [
            "test",
            "--datasets",
            "cub-test",
            "--data-root",
            str(cub_root),
            "--student-path",
            str(networks["narrow"]),
            "--teacher-path",
            str(networks["teacher"]),
            "--image-size",
            "32",
            "--workers",
            "0",
            "--json",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    assert "8 dimensions" in capsys.readouterr().err
    assert out.read_text() == "previous results"
    assert not (cub_root / "cache").exists()


def test_missing_dataset_names_the_download_commands(tmp_path: Path, networks, capsys):
    code = main(
        [
            "test",
            "--datasets",
            "cub-test",
            "--data-root",
            str(tmp_path / "nowhere"),
            "--sym",
            "--student-path",
            str(networks["student"]),
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "CUB_200_2011.tgz" in err


def test_unknown_network_lists_published_names(cub_root: Path, capsys):
    code = main(
        [
            "test",
            "--datasets",
            "cub-test",
            "--data-root",
            str(cub_root),
            "--sym",
            "--student-path",
            "no-such-network",
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    assert "cub-448r-resnet50-512-gem-w" in capsys.readouterr().err


def test_extract_rows_in_split_order_and_cache_reuse(cub_root: Path, networks, tmp_path: Path):
    common = [
        "extract",
        "--network-path",
        str(networks["teacher"]),
        "--dataset",
        "cub-val",
        "--data-root",
        str(cub_root),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    args = [*common, "--image-size", "32"]
    first, second = tmp_path / "a.npy", tmp_path / "b.npy"
    assert main([*args, "--output", str(first)]) == 0
    emb = np.load(first)
    assert emb.shape == (100, 16)  # 50 val classes x 2 images
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    meta = json.loads(first.with_suffix(".json").read_text())
    assert len(meta["paths"]) == 100 and meta["image_size"] == 32
    cache_dir = cub_root / "cache" / "embeddings"
    assert len(list(cache_dir.glob("*.npy"))) == 1
    # a second run reads the cache (same file, same numbers); another size gets its own entry
    assert main([*args, "--output", str(second)]) == 0
    np.testing.assert_array_equal(np.load(second), emb)
    assert len(list(cache_dir.glob("*.npy"))) == 1
    assert main([*common, "--image-size", "40", "--output", str(second)]) == 0
    assert len(list(cache_dir.glob("*.npy"))) == 2


def test_extract_refuses_a_non_npy_output(cub_root: Path, networks, tmp_path: Path):
    with pytest.raises(SystemExit, match=r"\.npy"):
        main(
            [
                "extract",
                "--network-path",
                str(networks["teacher"]),
                "--dataset",
                "cub-val",
                "--data-root",
                str(cub_root),
                "--output",
                str(tmp_path / "x.txt"),
                "--device",
                "cpu",
            ]
        )


def test_seed_test_py_command_runs_verbatim(cub_root: Path, networks, tmp_path: Path):
    # The seed's example, with our tiny data and networks substituted for the published ones.
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "test.py"),
            "--datasets",
            "cub-test",
            "--sym",
            "--student-path",
            str(networks["student"]),
            "--teacher-path",
            str(networks["teacher"]),
            "--image-size",
            "32",
            "--teacher-image-size",
            "48",
            "--data-root",
            str(cub_root),
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "asym" in result.stdout and "sym" in result.stdout


def test_raml_test_with_an_index_as_the_database_equals_the_exact_test(cub_root: Path, networks, tmp_path: Path):
    index_dir = tmp_path / "index"
    assert main(["index", "--network-path", str(networks["teacher"]), "--image-size", "48", "--data-root",
                 str(cub_root), "--dataset", "cub-test", "--output", str(index_dir), "--workers", "0",
                 "--device", "cpu"]) == 0  # fmt: skip
    common = ["test", "--datasets", "cub-test", "--data-root", str(cub_root), "--student-path",
              str(networks["student"]), "--image-size", "32", "--workers", "0", "--device", "cpu",
              "--no-progress"]  # fmt: skip
    exact, via_index = tmp_path / "exact.json", tmp_path / "index.json"
    assert main([*common, "--teacher-path", str(networks["teacher"]), "--teacher-image-size", "48",
                 "--json", str(exact)]) == 0  # fmt: skip
    assert main([*common, "--index", str(index_dir), "--json", str(via_index)]) == 0
    a = json.loads(exact.read_text())["cub-test"]["asym"]
    b = json.loads(via_index.read_text())["cub-test"]["asym"]
    for key in ("mAP", "R@1", "R@2", "R@4", "R@8"):
        assert abs(a[key] - b[key]) < 1e-6, key
