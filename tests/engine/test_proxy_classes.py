"""``--loss normsoftmax`` needs two classes: with one, its proxy is the only one and the loss is exactly 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raml.engine.mining import class_groups, proxy_classes

MESSAGE = "--loss normsoftmax) needs at least 2 classes with at least 2 images"


def test_proxy_classes_keep_the_classes_of_two_images_or_more() -> None:
    assert proxy_classes([0, 0, 1, 2, 2, 2]) == [[0, 1], [3, 4, 5]]  # class 1 (one image) takes no part


@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 2], []])
def test_fewer_than_two_usable_classes_are_refused(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="needs at least 2 classes") as error:
        proxy_classes(labels)
    assert MESSAGE in str(error.value)
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        class_groups(labels, 8, 2, torch.Generator().manual_seed(0))


def test_raml_train_refuses_one_training_class_in_one_line(tmp_path: Path, capsys) -> None:
    from raml.cli import main as cli_main
    from raml.data.synth import generate_synthetic_dataset

    generate_synthetic_dataset(tmp_path / "data" / "synth", num_classes=2, images_per_class=8, image_size=32)
    run = tmp_path / "run"
    data = ["-d", "synth", "-td", "synth-test", "--data-root", str(tmp_path / "data"), "--directory", str(run)]
    runtime = ["--device", "cpu", "--workers", "0", "--epochs", "1", "--batch-size", "8", "--update-every", "1"]
    network = ["--student", "test_resnet", "--not-pretrained", "--image-size", "32"]
    argv = ["train", "--mode", "sym", "--loss", "normsoftmax", *network, *data, *runtime, "--no-progress"]
    assert cli_main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert MESSAGE in err and "this split has 1 such class(es) of 1" in err
    assert not list(run.glob("model_*.pth.tar"))
