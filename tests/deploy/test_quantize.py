"""``raml export --int8``: a static int8 ONNX student, smaller than the fp32 one and close to it; a broken
calibration and bad inputs are refused with nothing written."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from raml.cli import main as cli_main
from raml.data import EvalTransform, get_split, load_image
from raml.deploy import quantize as quantize_module
from raml.deploy.export import export_onnx, onnx_session, read_sidecar, sidecar_path
from raml.deploy.quantize import QuantizationError, evenly_spaced, quantize_onnx
from raml.models import load_network

S = 32
#: what a correct int8 model of the tiny test network reaches on every image (it measures ~0.999); a
#: calibration on blank images (below) gives ~0.45
MIN_COSINE_PER_IMAGE = 0.99
#: largest difference of a retrieval metric (in points) between the int8 and the fp32 student under `raml test`:
#: one query of synth-test's 20 changing its top hit moves R@1 by 5 points
INT8_METRIC_TOLERANCE = 5.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_and_networks) -> dict:
    """synth (train 4 classes, test 4 classes x 5 images), a timm test_resnet student (16-d) and its fp32 export."""
    base = tmp_path_factory.mktemp("quantize")
    root, nets = synth_and_networks("timm/test_resnet", {"student": (16, 0)})
    net = nets["student"]
    fp32 = base / "fp32.onnx"
    export_onnx(load_network(net), S, fp32, exporter="torchscript")
    return {"base": base, "root": root, "net": net, "fp32": fp32}


def _export_args(setup, output, *extra: str) -> list[str]:
    args = ["export", "--network-path", str(setup["net"]), "--image-size", str(S), "--output", str(output)]
    return [*args, "--data-root", str(setup["root"]), *extra]


def _held_out(setup) -> list[str]:
    """Check images not used for calibration (calibration uses synth-train): synth-test."""
    return [str(p) for p in get_split("synth-test", setup["root"]).abspaths()]


def _embed(model, paths, sidecar, size: int | None = None) -> np.ndarray:
    transform = EvalTransform(size or sidecar["image_size"], sidecar["mean"], sidecar["std"])
    batch = torch.stack([transform(load_image(p)) for p in paths]).numpy()
    session = onnx_session(model)
    return session.run(None, {session.get_inputs()[0].name: batch})[0].astype(np.float64)


def test_int8_export_is_smaller_and_close_to_fp32(setup, tmp_path, capsys):
    out, report = tmp_path / "student.int8.onnx", tmp_path / "report.json"
    calibration = ["--int8", "--calibration-split", "synth-train", "--calibration-images", "8"]
    assert cli_main.main([*_export_args(setup, out, *calibration), "--json", str(report)]) == 0
    assert "onnx int8" in capsys.readouterr().out
    [record] = json.loads(report.read_text())
    assert record["calibration_images"] == 8 and record["int8_bytes"] == out.stat().st_size
    assert out.stat().st_size < 0.5 * setup["fp32"].stat().st_size

    # the graph holds int8 weights and quantise/dequantise pairs (QDQ); onnx imported here, not at collection,
    # where every pytest-xdist worker would pay its ~0.9 s import (ml_dtypes' extension) for this one test
    import onnx

    model = onnx.load(str(out))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 5  # one per convolution / linear layer at least

    sidecar = read_sidecar(out)
    quantization = sidecar["quantization"]
    assert quantization["format"] == "QDQ" and quantization["calibration_split"] == "synth-train"
    assert quantization["calibration_images"] == 8 and quantization["fp32_model"] == str(setup["net"])
    assert sidecar["image_size"] == S and sidecar["output_dim"] == 16

    # on held-out images (the test split; calibration used the training split) every embedding stays close,
    # and each int8 embedding's nearest fp32 embedding is that of its own image
    paths = [str(p) for p in get_split("synth-test", setup["root"]).abspaths()]
    fp32, int8 = _embed(setup["fp32"], paths, sidecar), _embed(out, paths, sidecar)
    cosines = (fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    assert cosines.min() > MIN_COSINE_PER_IMAGE
    assert (np.argmax(int8 @ fp32.T, axis=1) == np.arange(len(paths))).all()


def test_a_broken_calibration_is_refused_and_writes_nothing(setup, tmp_path, monkeypatch):
    out = tmp_path / "student.int8.onnx"
    out.write_bytes(b"previous model")
    real_reader = quantize_module._calibration_reader
    # blank calibration images: every activation range collapses, the int8 model saturates
    monkeypatch.setattr(
        quantize_module, "_calibration_reader", lambda name, images: real_reader(name, [x * 0 for x in images])
    )
    paths = evenly_spaced([str(p) for p in get_split("synth-train", setup["root"]).abspaths()], 8)
    with pytest.raises(QuantizationError, match="too far from the fp32") as error:
        quantize_onnx(setup["fp32"], out, paths, _held_out(setup))
    mean = float(str(error.value).split("mean cosine similarity ")[1].split(" ")[0])
    assert mean < 0.8
    assert out.read_bytes() == b"previous model" and not sidecar_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_bad_int8_inputs_are_clear_errors_and_write_nothing(setup, tmp_path, capsys):
    out = tmp_path / "student.onnx"
    with pytest.raises(SystemExit, match="--calibration-split"):
        cli_main.main(_export_args(setup, out, "--int8"))
    with pytest.raises(SystemExit, match="--int8"):
        cli_main.main(_export_args(setup, out, "--calibration-split", "synth-train"))
    assert cli_main.main(_export_args(setup, out, "--int8", "--calibration-split", "nosuch-train")) == 2
    assert "nosuch" in capsys.readouterr().err
    # every image of the split calibrates and none is left to check the int8 model on: refused before the export
    every = ["--int8", "--calibration-split", "synth-train", "--calibration-images", "100000"]
    with pytest.raises(SystemExit, match="takes every image of --calibration-split synth-train"):
        cli_main.main(_export_args(setup, out, *every))
    assert list(tmp_path.iterdir()) == []

    # quantising something that is not an ONNX model, or an int8 model again
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x00garbage")
    sidecar_path(fake).write_text(sidecar_path(setup["fp32"]).read_text())
    paths = [str(p) for p in get_split("synth-test", setup["root"]).abspaths()][:2]
    with pytest.raises(ValueError, match="describes another model file than"):  # the fp32 export's sidecar
        quantize_onnx(fake, tmp_path / "q.onnx", paths, _held_out(setup))
    record = json.loads(sidecar_path(fake).read_text())
    record["model_sha256"] = hashlib.sha256(fake.read_bytes()).hexdigest()  # now it names the file
    sidecar_path(fake).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="not an ONNX model"):
        quantize_onnx(fake, tmp_path / "q.onnx", paths, _held_out(setup))
    with pytest.raises(FileNotFoundError, match="sidecar"):
        quantize_onnx(setup["net"], tmp_path / "q.onnx", paths)
    with pytest.raises(ValueError, match="must not replace"):
        quantize_onnx(setup["fp32"], setup["fp32"], paths)
    with pytest.raises(ValueError, match="calibration method"):
        quantize_onnx(setup["fp32"], tmp_path / "q.onnx", paths, method="magic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.onnx", "fake.onnx.json"]
    record = json.loads(sidecar_path(fake).read_text())
    record["quantization"] = {"format": "QDQ"}
    sidecar_path(fake).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="already quantised"):
        quantize_onnx(fake, tmp_path / "q.onnx", paths)


def test_evenly_spaced_takes_first_last_and_spreads_the_rest():
    items = [f"img{i}" for i in range(10)]
    assert evenly_spaced(items, 4) == ["img0", "img3", "img6", "img9"]
    assert evenly_spaced(items, 1) == ["img0"]
    assert evenly_spaced(items, 20) == items
    with pytest.raises(ValueError, match="positive"):
        evenly_spaced(items, 0)


@pytest.fixture(scope="module")
def bench(setup, tmp_path_factory) -> dict:
    """One tiny ``run_quantization_benchmark`` run, with the query embeddings of each row recorded (in row order)."""
    from raml.bench import quantization as bench_module
    from raml.deploy import IndexParams

    recorded: list[np.ndarray] = []
    real_extract = bench_module.extract_embeddings

    def recording_extract(*args, **kwargs):
        embeddings = real_extract(*args, **kwargs)
        recorded.append(embeddings.numpy().astype(np.float64))
        return embeddings

    work = tmp_path_factory.mktemp("quantization_bench") / "work"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_module, "extract_embeddings", recording_extract)
        result = bench_module.run_quantization_benchmark(
            setup["net"],  # the student's own database: same dimension, all that matters here
            setup["net"],
            setup["root"],
            "synth-test",
            S,
            40,
            "synth-train",
            work,
            calibration_images=8,
            ivfpq=IndexParams("ivfpq", nlist=2, m=4, nbits=4),
            probes=[1, 2],
            repeats=1,
        )
    assert len(recorded) == len(result["rows"])
    return {"result": result, "work": work, "queries": recorded}


def test_quantization_benchmark_rows(bench):
    """The benchmark's table on tiny data: the fp32 export reproduces PyTorch, bytes are faiss's code sizes."""
    from raml.bench.quantization import format_quantization_report

    result = bench["result"]
    assert [r["nprobe"] for r in result["rows"]] == [None] * 3 + [1] * 3 + [2] * 3
    rows = {(r["query_network"], r["database"]): r for r in result["rows"] if r["nprobe"] != 1}
    assert len(rows) == 6
    for database, size in (("exact (flat)", 4 * 16), ("ivfpq", 4 * 4 // 8)):
        pytorch, fp32, int8 = (rows[(name, database)] for name in ("PyTorch fp32", "ONNX fp32", "ONNX int8"))
        assert fp32["mAP"] == pytest.approx(pytorch["mAP"], abs=1e-6) and fp32["R@1"] == pytorch["R@1"]
        assert all(r["bytes_per_vector"] == size and r["query_ms"] > r["embed_ms"] > 0 for r in (fp32, int8))
        assert 0 <= int8["mAP"] <= 100 and int8["num_queries"] == 20
    assert result["files"]["int8_bytes"] < result["files"]["fp32_bytes"]
    assert "| ONNX int8 | ivfpq | IVF2,PQ4x4np, nprobe 2 |" in format_quantization_report(result)


# ------------------------------------------------------------------------ issue 18, item 9: sizes, worst, held out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_a_multi_size_student_is_calibrated_and_checked_at_every_size(setup, tmp_path, monkeypatch):
    student = load_network(setup["net"])
    fp32 = tmp_path / "multi.onnx"
    export_onnx(student, S, fp32, dynamic_size=True, check_sizes=[S, 48], exporter="torchscript")
    assert read_sidecar(fp32)["image_sizes"] == [S, 48]
    seen: list[tuple[int, ...]] = []
    real_reader = quantize_module._calibration_reader

    def spying_reader(name, images):
        seen.extend(x.shape for x in images)
        return real_reader(name, images)

    monkeypatch.setattr(quantize_module, "_calibration_reader", spying_reader)
    calibration = evenly_spaced([str(p) for p in get_split("synth-train", setup["root"]).abspaths()], 8)
    out = tmp_path / "multi.int8.onnx"
    report = quantize_onnx(fp32, out, calibration, _held_out(setup))
    assert sorted(seen) == [(8, 3, S, S), (8, 3, 48, 48)]  # the calibration images at both sizes
    assert report.sizes == [S, 48] and set(report.cosine_by_size) == {str(S), "48"}
    assert report.checked_images == 20  # the held-out images only
    record = read_sidecar(out)["quantization"]
    assert record["sizes"] == [S, 48] and record["checked_images"] == 20
    # independently: at each size, every held-out image's int8 embedding stays close to its fp32 one, and the
    # report's worst cosine is the worst of these
    sidecar = read_sidecar(fp32)
    worst = []
    for size in (S, 48):
        cosines = _cosines(_embed(fp32, _held_out(setup), sidecar, size), _embed(out, _held_out(setup), sidecar, size))
        assert cosines.min() > MIN_COSINE_PER_IMAGE, size
        assert report.cosine_by_size[str(size)]["min"] == pytest.approx(cosines.min(), abs=1e-6)
        worst.append(cosines.min())
    assert report.min_cosine == pytest.approx(min(worst), abs=1e-6)


def test_the_gate_is_on_the_worst_image_and_on_held_out_images(setup, tmp_path):
    calibration = evenly_spaced([str(p) for p in get_split("synth-train", setup["root"]).abspaths()], 8)
    out = tmp_path / "q.onnx"
    # a mean that passes easily, a worst image that cannot (no int8 embedding equals its fp32 one exactly)
    with pytest.raises(QuantizationError, match=r"worst 0\.9\d+ at 32 px \(needs 1\.0\)"):
        quantize_onnx(setup["fp32"], out, calibration, _held_out(setup), min_cosine=0.01, min_worst_cosine=1.0)
    assert not out.exists()
    # and the other way round: a worst image that passes easily, a mean that cannot
    with pytest.raises(QuantizationError, match=r"mean cosine similarity 0\.9\d+ \(needs 1\.0\)"):
        quantize_onnx(setup["fp32"], out, calibration, _held_out(setup), min_cosine=1.0, min_worst_cosine=0.01)
    assert not out.exists()
    # the calibration images themselves are not a check
    with pytest.raises(ValueError, match="not used for calibration"):
        quantize_onnx(setup["fp32"], out, calibration, calibration)
    report = quantize_onnx(setup["fp32"], out, calibration, [*calibration, *_held_out(setup)[:5]])
    assert report.checked_images == 5


def test_raml_test_with_the_int8_student_is_within_tolerance_of_fp32(setup, tmp_path):
    """``raml test --student-onnx``: the int8 model's metrics within 5 points (one query of 20 at R@1) of the
    fp32 model's."""
    int8 = tmp_path / "student.int8.onnx"
    calibration = ["--int8", "--calibration-split", "synth-train", "--calibration-images", "8"]
    assert cli_main.main([*_export_args(setup, int8, *calibration)]) == 0
    results = {}
    for name, model in (("fp32", setup["fp32"]), ("int8", int8)):
        out = tmp_path / f"{name}.json"
        args = ["test", "--student-onnx", str(model), "--datasets", "synth-test", "--image-size", str(S)]
        args += ["--data-root", str(setup["root"]), "--teacher-path", str(setup["net"]), "--teacher-image-size", "40"]
        args += ["--json", str(out), "--device", "cpu", "--workers", "0", "--no-progress", "--no-cache"]
        assert cli_main.main(args) == 0
        results[name] = json.loads(out.read_text())["synth-test"]["asym"]
    assert set(results["int8"]) == set(results["fp32"]) and "mAP" in results["fp32"]
    for metric, value in results["fp32"].items():
        assert results["int8"][metric] == pytest.approx(value, abs=INT8_METRIC_TOLERANCE), metric
    print(f"fp32 {results['fp32']}\nint8 {results['int8']}")


def test_quantization_benchmark_int8_rows_measure_the_int8_file(setup, bench):
    """The int8 rows embed queries with the int8 file: its embeddings, which differ from the fp32 file's yet keep
    cosine >= 0.99 on every image, and the exact row's mAP is that of those embeddings against the database (an
    int8 row that measured the fp32 file passed the rows test)."""
    from raml.retrieval.extract import extract_embeddings
    from raml.retrieval.metrics import retrieval_metrics

    split = get_split("synth-test", setup["root"])
    paths = [str(p) for p in split.abspaths()]
    int8_file, fp32_file = bench["work"] / "student.int8.onnx", bench["work"] / "student.fp32.onnx"
    sidecar = read_sidecar(int8_file)
    int8, fp32 = _embed(int8_file, paths, sidecar), _embed(fp32_file, paths, sidecar)
    cosines = (fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    assert cosines.min() >= MIN_COSINE_PER_IMAGE and np.abs(int8 - fp32).max() > 1e-3

    rows = bench["result"]["rows"]
    int8_rows = [i for i, r in enumerate(rows) if r["query_network"] == "ONNX int8"]
    assert len(int8_rows) == 3
    for i in int8_rows:
        np.testing.assert_allclose(bench["queries"][i], int8, atol=1e-5)
    database = extract_embeddings(load_network(setup["net"]), paths, 40, torch.device("cpu"), progress=False)
    [exact] = [rows[i] for i in int8_rows if rows[i]["database"] == "exact (flat)"]
    queries = torch.from_numpy(int8).float()
    expected = retrieval_metrics(queries, database, split.labels, split.labels, exclude_self=True)
    assert exact["mAP"] == pytest.approx(expected["mAP"], abs=1e-4)


def test_the_report_says_the_int8_cosine_is_measured_on_held_out_images():
    """The cosine comes from quantize_onnx's check images, of the test split minus any calibration image; the
    report said 'on the calibration images'."""
    from raml.bench.quantization import format_quantization_report

    files = {"fp32_bytes": 2, "int8_bytes": 1, "int8_mean_cosine_to_fp32": 0.9999, "int8_min_cosine_to_fp32": 0.999}
    line = format_quantization_report({"rows": [], "files": {**files, "int8_checked_images": 64}}).splitlines()[-1]
    assert "cosine on 64 held-out images of the test split (not used for calibration): mean 0.9999" in line
    assert "calibration images" not in line
