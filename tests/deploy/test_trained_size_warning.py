"""A student's checkpoint records the sizes it was trained at (``ckpt["raml"]``): raml test, export and search
keep their default sizes when none is given, but warn when the record names other ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from raml.cli import main as cli_main

WARNING = "(the default"


class _Stop(Exception):
    """Raised by a stubbed step after the size warning: the test needs nothing that comes after it."""


def _with_record(source: Path, target: Path, record: dict) -> Path:
    from raml.models import load_network, save_checkpoint

    save_checkpoint(target, load_network(source), extra={"raml": record})
    return target


@pytest.fixture(scope="module")
def students(tmp_path_factory, random_network) -> dict[str, Path]:
    """A 16-d resnet18 student distilled at QR 32 / DR 64, one trained symmetrically at 32 px, and the plain
    checkpoint (no record), with the 16-d teacher."""
    base = tmp_path_factory.mktemp("trained_sizes")
    student = random_network("resnet18", 16, 1)
    return {
        "distilled": _with_record(
            student, base / "distilled.pth", {"mode": "ts_aug", "image_size": 32, "teacher_image_size": 64}
        ),
        "sym": _with_record(student, base / "sym.pth", {"mode": "sym", "image_size": 32, "teacher_image_size": 448}),
        "plain": student,
        "teacher": random_network("resnet18", 16, 0),
    }


def test_recorded_image_sizes(students) -> None:
    from raml.deploy.search import recorded_image_sizes

    assert recorded_image_sizes(students["distilled"]) == (32, 64)
    assert recorded_image_sizes(students["sym"]) == (32, None)  # a symmetric run has no database size
    assert recorded_image_sizes(students["plain"]) == (None, None)
    assert recorded_image_sizes(None) == (None, None)


def test_warn_if_default_sizes_names_each_defaulted_size_and_its_flag(caplog) -> None:
    from raml.deploy.search import warn_if_default_sizes

    with caplog.at_level("WARNING", logger="raml"):
        assert warn_if_default_sizes("s.pth", "testing", (32, 64), 224, 448)
    assert (
        "s.pth was trained at QR 32 / DR 64; testing at QR 224 / DR 448 (the defaults): pass --image-size 32 "
        "--teacher-image-size 64 to use the size(s) it was trained at." in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="raml"):
        assert warn_if_default_sizes("s.pth", "testing", (32, 64), None, 448)  # --image-size given
        assert not warn_if_default_sizes("s.pth", "testing", (32, 64), None, None)  # both given
        assert not warn_if_default_sizes("s.pth", "testing", (224, 448), 224, 448)  # trained at the defaults
        assert not warn_if_default_sizes("s.pth", "testing", (None, None), 224, 448)  # nothing recorded
    assert "trained at DR 64; testing at DR 448 (the default): pass --teacher-image-size 64 " in caplog.text
    assert caplog.text.count(WARNING) == 1


def _raml_test(students, cub_root: Path, monkeypatch, student: str, *sizes: str) -> int:
    from raml.cli import evaluate as test_cli

    def fake_evaluate_split(network, split, image_size, device, **kwargs):  # noqa: ARG001
        return {"asym": {"mAP": 1.0}}

    monkeypatch.setattr(test_cli, "evaluate_split", fake_evaluate_split)
    networks = ["-spath", str(students[student]), "-tpath", str(students["teacher"])]
    common = ["-d", "cub-test", "--data-root", str(cub_root), "--device", "cpu", "--cpu-runtime", "torch"]
    argv = ["test", *networks, *common, "--no-progress", *sizes]
    return cli_main.main(argv)


def test_raml_test_warns_when_testing_a_distilled_student_at_the_default_sizes(
    students, cub_root: Path, monkeypatch, capsys
) -> None:
    assert _raml_test(students, cub_root, monkeypatch, "distilled") == 0
    err = capsys.readouterr().err
    assert err.count(WARNING) == 1
    assert (
        f"{students['distilled']} was trained at QR 32 / DR 64; testing at QR 224 / DR 448 (the defaults): pass "
        "--image-size 32 --teacher-image-size 64" in err
    )

    assert _raml_test(students, cub_root, monkeypatch, "distilled", "--image-size", "32", "-timsize", "64") == 0
    assert WARNING not in capsys.readouterr().err
    # the default value given on purpose is not "the default"
    assert _raml_test(students, cub_root, monkeypatch, "distilled", "--image-size", "32", "-timsize", "448") == 0
    assert WARNING not in capsys.readouterr().err
    assert _raml_test(students, cub_root, monkeypatch, "plain") == 0
    assert WARNING not in capsys.readouterr().err


def test_raml_export_warns_when_exporting_at_the_default_size(students, tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import raml.deploy.export

    def stop(*args, **kwargs):  # noqa: ARG001
        raise _Stop

    monkeypatch.setattr(raml.deploy.export, "export_onnx", stop)
    argv = ["export", "--network-path", str(students["distilled"]), "--output", str(tmp_path / "s.onnx")]
    with pytest.raises(_Stop):
        cli_main.main(argv)
    err = capsys.readouterr().err
    assert "was trained at QR 32; exporting at QR 224 (the default): pass --image-size 32 " in err
    with pytest.raises(_Stop):
        cli_main.main([*argv, "--image-size", "32"])
    assert WARNING not in capsys.readouterr().err


def test_raml_search_warns_when_searching_at_the_default_query_size(
    students, indexed_synth_world, monkeypatch, capsys
) -> None:
    pytest.importorskip("faiss")
    import raml.deploy.embed

    world = indexed_synth_world(32)

    def stop(*args, **kwargs):  # noqa: ARG001
        raise _Stop

    monkeypatch.setattr(raml.deploy.embed, "embed_images", stop)
    argv = ["search", "--network-path", str(students["distilled"]), "--index", str(world["index"]),
            "--device", "cpu", "--no-progress", world["paths"][0]]  # fmt: skip
    with pytest.raises(_Stop):
        cli_main.main(argv)
    err = capsys.readouterr().err
    assert "was trained at QR 32; searching at QR 224 (the default): pass --image-size 32 " in err
    with pytest.raises(_Stop):
        cli_main.main([*argv, "--image-size", "32"])
    assert WARNING not in capsys.readouterr().err


def test_recorded_teacher_sha256_reads_only_the_record(students, tmp_path: Path, monkeypatch) -> None:
    """The teacher hash comes from the run record (run_record: memory-mapped, quiet), never from a full load of the
    checkpoint; a reference checkpoint (legacy pickle, no record) and a plain one record no teacher."""
    import torch

    from raml.deploy.search import recorded_teacher_sha256
    from raml.models import load_network

    distilled = _with_record(students["plain"], tmp_path / "distilled.pth", {"teacher_sha256": "f" * 64})
    reference = tmp_path / "reference.pth.tar"
    state = load_network(students["plain"]).state_dict()
    torch.save({"epoch": 3, "state_dict": state}, reference, _use_new_zipfile_serialization=False)

    def full_load(*args, **kwargs):
        raise AssertionError("the whole checkpoint was loaded to read its teacher hash")

    monkeypatch.setattr("raml.models.checkpoints.load_checkpoint_file", full_load)
    monkeypatch.setattr("raml.deploy.search.load_checkpoint_file", full_load, raising=False)
    assert recorded_teacher_sha256(distilled) == "f" * 64
    assert recorded_teacher_sha256(students["distilled"]) is None  # a record without a teacher hash
    assert recorded_teacher_sha256(students["plain"]) is None
    assert recorded_teacher_sha256(reference) is None
    assert recorded_teacher_sha256(None) is None
