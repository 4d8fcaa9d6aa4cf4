"""``raml test``, ``raml extract`` and the ``python test.py`` shim on tiny on-disk datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raml.cli.main import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def networks(random_network) -> dict[str, Path]:
    """A 16-d 'teacher', a 16-d 'student' and an 8-d network, resnet18 with random weights (seeds 0, 1, 2),
    shared by the session (``random_network``: the tests only read them)."""
    return {
        name: random_network("resnet18", dim, seed)
        for name, dim, seed in (("teacher", 16, 0), ("student", 16, 1), ("narrow", 8, 2))
    }


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
    assert main([*common, "--image-size", "40", "--output", str(second), "--overwrite"]) == 0
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


def test_raml_test_wires_devices_scales_and_hashing_into_the_protocol(
    sop_root: Path, networks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """-g '0,1' puts the teacher on the second device; -ms and --hash-images reach evaluate_split."""
    import torch

    from raml.cli import evaluate as test_cli

    seen: dict = {}

    def fake_devices(gpu_id, device):
        seen["gpu_id"] = (gpu_id, device)
        return torch.device("cpu"), torch.device("meta")  # two distinguishable devices on any machine

    def fake_evaluate_split(student, split, image_size, device, **kwargs):
        seen.update(kwargs, student=student, device=device, image_size=image_size, split=split.name)
        return {"asym": {"mAP": 1.0, "R@1": 2.0}}

    monkeypatch.setattr(test_cli, "devices_from_gpu_id", fake_devices)
    monkeypatch.setattr(test_cli, "evaluate_split", fake_evaluate_split)
    code = main(["test", "-spath", str(networks["student"]), "-tpath", str(networks["teacher"]), "-g", "0,1",
                 "-ms", "[1, 1/2]", "--hash-images", "-imsize", "32", "-timsize", "48", "-d", "sop-test",
                 "--data-root", str(sop_root), "--no-progress"])  # fmt: skip
    assert code == 0
    assert seen["gpu_id"] == ("0,1", "auto")
    assert seen["device"] == torch.device("cpu") and seen["teacher_device"] == torch.device("meta")
    assert next(seen["student"].parameters()).device.type == "cpu"
    assert next(seen["teacher"].parameters()).device.type == "meta"
    assert seen["query_scales"] == (1.0, 0.5) and seen["content_hash"] is True
    assert (seen["image_size"], seen["teacher_image_size"], seen["split"]) == (32, 48, "sop-test")


def test_raml_test_scans_at_the_largest_size_it_embeds_at(
    sop_root: Path, networks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """An image fine at the query size but too large once resized at the teacher's database size is a bad image
    of the pre-test scan: an error naming it, or left out with --bad-images skip."""
    from PIL import Image

    from raml.cli import evaluate as test_cli

    # 20000 x 1: 731429 x 37 at QR = 32 (27 M pixels, under the limit), 1097143 x 55 at DR = 48 (60 M, over)
    victim = sorted((sop_root / "sop").rglob("*.JPG"))[-1]
    Image.new("L", (20_000, 1)).save(victim, format="PNG")
    seen: dict = {}

    def fake_evaluate_split(student, split, image_size, device, **kwargs):
        seen["paths"] = split.paths
        return {"asym": {"mAP": 1.0, "R@1": 2.0}}

    monkeypatch.setattr(test_cli, "evaluate_split", fake_evaluate_split)
    argv = ["test", "-spath", str(networks["student"]), "-tpath", str(networks["teacher"]), "-imsize", "32",
            "-timsize", "48", "-d", "sop-test", "--data-root", str(sop_root), "--no-progress", "--device", "cpu",
            "--no-cache"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "too large once resized" in err and "1097143x55" in err
    assert "paths" not in seen  # refused before any embedding
    assert main([*argv, "--bad-images", "skip"]) == 0
    assert seen["paths"] and not any(victim.name in p for p in seen["paths"])


def test_model_hints_reach_load_network_only_when_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import torch

    import raml.models
    from raml import entry as networks_cli

    calls = []

    class Loaded(torch.nn.Module):
        source_path = None

    def fake_load_network(path, **kwargs):
        calls.append(kwargs)
        return Loaded()

    monkeypatch.setattr(raml.models, "load_network", fake_load_network)
    cpu = torch.device("cpu")
    networks_cli.network_from_args("old.pth", None, tmp_path, cpu)
    networks_cli.network_from_args("old.pth", None, tmp_path, cpu, pooling="mac", whitening=0)
    assert calls[0] == {"data_root": tmp_path, "device": cpu}
    assert calls[1] == {"data_root": tmp_path, "device": cpu, "pooling": "mac", "whitening": 0}
    # an architecture: the reference's defaults (gem, no whitening) unless given
    built = networks_cli.network_from_args(None, "resnet18", tmp_path, cpu, pretrained=False)[0]
    assert built.meta["pooling"] == "gem" and built.meta["whitening"] == 0
    built = networks_cli.network_from_args(None, "resnet18", tmp_path, cpu, "mac", 16, pretrained=False)[0]
    assert built.meta["pooling"] == "mac" and built.output_dim == 16


def test_raml_test_multiscale_runs_and_refuses_it_with_an_index(cub_root: Path, networks, tmp_path: Path, capsys):
    common = ["test", "-d", "cub-val", "--data-root", str(cub_root), "-spath", str(networks["student"]),
              "-imsize", "32", "-j", "0", "-g", "0", "--no-progress", "--sym"]  # fmt: skip
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    assert main([*common, "--json", str(single)]) == 0
    assert main([*common, "-ms", "[1, 2**(1/2)]", "--json", str(multi)]) == 0
    a, b = (json.loads(p.read_text())["cub-val"]["sym"] for p in (single, multi))
    assert a["num_queries"] == b["num_queries"] == 100
    assert a["mAP"] != b["mAP"]  # the queries are other embeddings
    with pytest.raises(SystemExit, match="multi-scale"):
        main([*common, "-ms", "[1, 0.5]", "--index", str(tmp_path)])


def test_extract_re_embeds_an_image_rewritten_in_place(sop_root: Path, networks, tmp_path: Path):
    """The cache key holds each image's size and mtime: a regenerated image is never served stale."""
    from PIL import Image

    from raml.data.splits import get_split

    common = ["extract", "-npath", str(networks["teacher"]), "--dataset", "sop-test", "--data-root", str(sop_root),
              "-imsize", "32", "-j", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    first, second = tmp_path / "first.npy", tmp_path / "second.npy"
    assert main([*common, "--output", str(first)]) == 0
    split = get_split("sop-test", sop_root)
    changed = 5
    image = split.root / split.paths[changed]
    with Image.open(image) as img:
        inverted = 255 - np.asarray(img.convert("RGB"))
    Image.fromarray(inverted.astype(np.uint8)).save(image, format="JPEG")  # same name, other content
    assert main([*common, "--output", str(second)]) == 0
    a, b = np.load(first), np.load(second)
    assert np.flatnonzero(np.abs(a - b).max(axis=1) > 1e-6).tolist() == [changed]
    assert len(list((sop_root / "cache" / "embeddings").glob("*.npy"))) == 2  # not reused: a second entry


def test_extract_multiscale_is_its_own_cache_entry(sop_root: Path, networks, tmp_path: Path):
    common = ["extract", "-npath", str(networks["teacher"]), "--dataset", "sop-test", "--data-root", str(sop_root),
              "-imsize", "32", "-j", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    single, multi = tmp_path / "single.npy", tmp_path / "multi.npy"
    assert main([*common, "--output", str(single)]) == 0
    assert main([*common, "-ms", "[1, 1/2**(1/2)]", "--output", str(multi)]) == 0
    assert len(list((sop_root / "cache" / "embeddings").glob("*.npy"))) == 2
    assert not np.allclose(np.load(single), np.load(multi))
    meta = json.loads(multi.with_suffix(".json").read_text())
    assert meta["multiscale"] == pytest.approx([1.0, 2**-0.5])
    assert meta["multiscale_power"] == 1.0  # whitened network: a plain mean over scales


def test_test_and_extract_use_the_val_ratio_the_run_recorded(cub_root: Path, networks, tmp_path: Path, monkeypatch):
    import logging

    import raml.cli.evaluate as evaluate_cli

    run = tmp_path / "run"  # a training run's folder: its checkpoint beside the config.yaml it recorded
    run.mkdir()
    (run / "model_best.pth.tar").symlink_to(networks["student"])
    (run / "config.yaml").write_text("mode: sym\nval_ratio: 0.25\n")
    out = tmp_path / "val.npy"
    common = ["--data-root", str(cub_root), "--workers", "0", "--device", "cpu", "--no-progress"]
    checkpoint = ["--network-path", str(run / "model_best.pth.tar")]
    extract = ["extract", *checkpoint, "--dataset", "cub-val", "--image-size", "32", "--output", str(out)]
    assert main([*extract, *common]) == 0
    # 100 train + val classes, 0.25 of them val: 25 classes x 2 images (the default 0.5 would give 50 classes)
    assert len(json.loads(out.with_suffix(".json").read_text())["labels"]) == 50

    tested: dict[str, int] = {}

    def fake_evaluate_split(student, split, *args, **kwargs):  # noqa: ARG001
        tested[split.name] = len(split)
        return {"sym": {"mAP": 0.0}}

    monkeypatch.setattr(evaluate_cli, "evaluate_split", fake_evaluate_split)
    test = ["test", "--student-path", str(run / "model_best.pth.tar"), "--sym", "-d", "cub-val", "--cpu-runtime"]
    assert main([*test, "torch", *common]) == 0
    assert tested == {"cub-val": 50}
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("raml").addHandler(handler)
    try:
        assert main([*test, "torch", "--val-ratio", "0.5", *common]) == 0
    finally:
        logging.getLogger("raml").removeHandler(handler)
    assert tested == {"cub-val": 100}  # the given value is used ...
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("--val-ratio 0.5 differs from the val_ratio 0.25" in m for m in warnings)  # ... with a warning
    with pytest.raises(SystemExit) as stop:  # not a share in [0, 1): a usage error
        main([*test, "torch", "--val-ratio", "1.5", *common])
    assert stop.value.code == 2


@pytest.mark.parametrize("command", ["extract", "test"])
def test_a_multiscale_scale_past_the_pixel_limit_is_refused_before_any_work(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 64 * 400 = 25600: 655M pixels per image (7.8 GB in F.interpolate); no dataset or network exists here,
    # so the refusal comes before either is looked at
    network = str(tmp_path / "none.pth")
    if command == "extract":
        argv = ["extract", "--network-path", network, "--dataset", "cub-test", "--output", str(tmp_path / "e.npy")]
    else:
        argv = ["test", "--student-path", network, "--teacher-path", network, "--datasets", "cub-test"]
    argv += ["--data-root", str(tmp_path / "data"), "--image-size", "64", "-ms", "[1, 400]", "--device", "cpu"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"raml {command}: --multiscale: scale 400 ") and "\n" not in error
    assert "25600x25600" in error and "limit of 40000000 pixels" in error and "at most 98.8" in error
    assert not list(tmp_path.iterdir())
