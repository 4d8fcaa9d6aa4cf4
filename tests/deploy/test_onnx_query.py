"""An exported ONNX student as a query network: ``raml test --student-onnx`` gives the PyTorch student's metrics
(fp32 export), by both the exact protocol and an index; bad files and flags are clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from raml.cli import main as cli_main
from raml.deploy.export import export_onnx, sidecar_path
from raml.deploy.onnx_network import OnnxQueryNetwork
from raml.models import load_network
from raml.retrieval.extract import extract_embeddings

QR, DR = 32, 48
CPU = torch.device("cpu")
RUNTIME = ["--device", "cpu", "--workers", "0", "--no-progress", "--no-cache"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_and_networks) -> dict:
    """synth-test (4 classes x 5 images), a teacher and a student (timm test_resnet, 16-d), the student in ONNX."""
    base = tmp_path_factory.mktemp("onnx_query")
    root, nets = synth_and_networks("timm/test_resnet", {"teacher": (16, 0), "student": (16, 1)})
    onnx_file = base / "student.onnx"
    export_onnx(load_network(nets["student"]), QR, onnx_file, exporter="torchscript")
    return {"base": base, "root": root, "nets": nets, "onnx": onnx_file}


def _raml_test(setup, tmp_path: Path, student: list[str], *extra: str) -> dict:
    out = tmp_path / f"result_{len(list(tmp_path.iterdir()))}.json"
    args = ["test", *student, "--datasets", "synth-test", "--image-size", str(QR), "--data-root", str(setup["root"])]
    assert cli_main.main([*args, *extra, "--json", str(out), *RUNTIME]) == 0
    return json.loads(out.read_text())["synth-test"]


def test_onnx_query_network_embeds_like_pytorch(setup):
    network = OnnxQueryNetwork(setup["onnx"])
    student = load_network(setup["nets"]["student"])
    assert network.meta["outputdim"] == 16 and network.output_dim == 16 and network.image_size == QR
    assert network.meta["mean"] == pytest.approx(list(student.mean))
    paths = sorted((setup["root"] / "synth").rglob("*.jpg"))[:7]
    onnx_rows = extract_embeddings(network, paths, QR, CPU, batch_size=3, progress=False)
    torch_rows = extract_embeddings(student, paths, QR, CPU, batch_size=3, progress=False)
    assert onnx_rows.shape == (7, 16) and onnx_rows.dtype == torch.float32
    assert (onnx_rows - torch_rows).abs().max() < 1e-4
    with pytest.raises(ValueError, match="fixed size"):
        network(torch.zeros(1, 3, QR + 8, QR + 8))
    with pytest.raises(ValueError, match="--image-size 32"):
        network.check_image_size(QR * 2)


def test_raml_test_with_the_fp32_onnx_student_gives_the_pytorch_metrics(setup, tmp_path):
    teacher = ["--teacher-path", str(setup["nets"]["teacher"]), "--teacher-image-size", str(DR)]
    pytorch = _raml_test(setup, tmp_path, ["--student-path", str(setup["nets"]["student"])], *teacher, "--sym")
    onnx = _raml_test(setup, tmp_path, ["--student-onnx", str(setup["onnx"])], *teacher, "--sym")
    assert set(pytorch) == set(onnx) == {"asym", "sym"}
    for test in ("asym", "sym"):
        assert set(onnx[test]) == set(pytorch[test])
        for metric, value in pytorch[test].items():
            assert onnx[test][metric] == pytest.approx(value, abs=1e-6), (test, metric)
    # the test must be able to tell students apart: the teacher as query network scores differently
    other = _raml_test(setup, tmp_path, ["--student-path", str(setup["nets"]["teacher"])], *teacher)
    assert other["asym"]["mAP"] != pytest.approx(pytorch["asym"]["mAP"], abs=1e-3)


def test_raml_test_with_the_onnx_student_against_an_index(setup, tmp_path):
    index = tmp_path / "index"
    args = ["index", "--network-path", str(setup["nets"]["teacher"]), "--image-size", str(DR)]
    args += ["--data-root", str(setup["root"]), "--dataset", "synth-test", "--output", str(index)]
    assert cli_main.main([*args, "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    pytorch = _raml_test(setup, tmp_path, ["--student-path", str(setup["nets"]["student"])], "--index", str(index))
    onnx = _raml_test(setup, tmp_path, ["--student-onnx", str(setup["onnx"])], "--index", str(index))
    for metric in ("mAP", "R@1", "R@2", "R@4", "R@8"):
        assert onnx["asym"][metric] == pytest.approx(pytorch["asym"][metric], abs=1e-6), metric


def test_bad_onnx_students_are_clear_errors(setup, tmp_path, capsys):
    teacher = ["--teacher-path", str(setup["nets"]["teacher"]), "--data-root", str(setup["root"]), "-d", "synth-test"]
    # a checkpoint is not an exported model: no sidecar
    assert cli_main.main(["test", "--student-onnx", str(setup["nets"]["student"]), *teacher, *RUNTIME]) == 2
    assert "sidecar" in capsys.readouterr().err
    # another export's sidecar beside a file: it describes another model (its model_sha256)
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"not a protobuf at all")
    sidecar_path(fake).write_text(sidecar_path(setup["onnx"]).read_text())
    assert cli_main.main(["test", "--student-onnx", str(fake), *teacher, *RUNTIME]) == 2
    assert "describes another model file than" in capsys.readouterr().err
    # a sidecar that names the file, next to something that is not ONNX
    record = json.loads(sidecar_path(setup["onnx"]).read_text())
    record["model_sha256"] = hashlib.sha256(fake.read_bytes()).hexdigest()
    sidecar_path(fake).write_text(json.dumps(record))
    assert cli_main.main(["test", "--student-onnx", str(fake), *teacher, *RUNTIME]) == 2
    assert "not an ONNX model" in capsys.readouterr().err
    # a size the fixed-size export cannot take, refused before any image is read
    args = ["test", "--student-onnx", str(setup["onnx"]), *teacher]
    assert cli_main.main([*args, "--image-size", "64", *RUNTIME]) == 2
    assert "--image-size 32" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="multi-scale"):
        cli_main.main([*args, "--image-size", "32", "-ms", "[1, 0.5]", *RUNTIME])
    with pytest.raises(SystemExit, match="one query size"):
        cli_main.main([*args, "--image-size", "32,48", *RUNTIME])
    with pytest.raises(SystemExit):  # argparse: --student-onnx and --student-path exclude each other
        cli_main.main([*args, "--student-path", str(setup["nets"]["student"]), *RUNTIME])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.onnx", "fake.onnx.json"]


def test_every_onnx_command_opens_its_session_with_the_project_settings(setup, tmp_path, monkeypatch):
    """``raml test --student-onnx``, ``raml search --onnx`` and the export's parity check open onnxruntime
    sessions with torch's intra-op thread count (not onnxruntime's one per core) and no spin-waiting, like
    ``raml serve --onnx`` and the checked onnxruntime forward."""
    pytest.importorskip("faiss")
    import onnxruntime

    made: list = []
    real = onnxruntime.InferenceSession

    def spy(model, sess_options=None, **kwargs):
        made.append(sess_options)
        return real(model, sess_options=sess_options, **kwargs)

    def spinning(options) -> str | None:
        try:
            return options.get_session_config_entry("session.intra_op.allow_spinning")
        except Exception:  # noqa: BLE001 - onnxruntime raises its own type for an entry never set
            return None

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    threads = torch.get_num_threads()
    export_onnx(load_network(setup["nets"]["student"]), QR, tmp_path / "again.onnx", exporter="torchscript")
    assert made, "the parity check opened no session"
    index = tmp_path / "index"
    args = ["index", "--network-path", str(setup["nets"]["teacher"]), "--image-size", str(DR)]
    args += ["--data-root", str(setup["root"]), "--dataset", "synth-test", "--output", str(index)]
    assert cli_main.main([*args, "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    counts = [len(made)]
    _raml_test(setup, tmp_path, ["--student-onnx", str(setup["onnx"])], "--index", str(index))
    counts.append(len(made))
    query = str(sorted((setup["root"] / "synth").rglob("*.jpg"))[0])
    search = ["search", "--onnx", str(setup["onnx"]), "--index", str(index), "--workers", "0", "--no-progress"]
    assert cli_main.main([*search, query]) == 0
    counts.append(len(made))
    assert counts[0] < counts[1] < counts[2], f"a command opened no session: {counts}"
    for options in made:
        assert options is not None and options.intra_op_num_threads == threads
        assert spinning(options) == "0"
