"""``raml test`` on a checkpoint written by the reference's training: no ``meta``, PyTorch 1.12 scheduler state."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from raml.cli.main import main
from raml.models import EmbeddingNetwork, build_network, save_checkpoint


def _reference_checkpoint(network: EmbeddingNetwork) -> dict:
    """The dict the reference's ``save_checkpoint`` writes (``epoch``, ``state_dict``, ``max_map``, ``optimizer``,
    ``scheduler``; no ``meta``), with its AdamW + OneCycleLR after one step, as PyTorch 1.12 pickled them."""
    lr = 1e-4
    groups = [{"params": network.backbone.parameters()}]
    if network.meta["pooling"] == "gem":
        groups.append({"params": network.pool.parameters(), "lr": lr * 10, "weight_decay": 0})
    groups.append({"params": network.whiten.parameters()})
    optimizer = torch.optim.AdamW(groups, lr, weight_decay=1e-6)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, div_factor=10, steps_per_epoch=2, epochs=1)
    network(torch.rand(2, 3, 32, 32)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    scheduler_state = scheduler.state_dict()
    # PyTorch 1.12's OneCycleLR state held its annealing function as a method bound to the scheduler.
    scheduler_state["anneal_func"] = types.MethodType(torch.optim.lr_scheduler.OneCycleLR._annealing_cos, scheduler)
    return {
        "epoch": 1,
        "state_dict": network.state_dict(),
        "max_map": np.float64(0.25),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler_state,
    }


def _raml_test(student: Path, data_root: Path, out: Path) -> int:
    return main(
        [
            "test",
            "--student-path",
            str(student),
            "--datasets",
            "cub-test",
            "--data-root",
            str(data_root),
            "--image-size",
            "32",
            "--sym",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )


def test_raml_test_on_a_reference_training_checkpoint(cub_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    network = build_network("resnet18", pooling="gem", whitening=16, pretrained=False).eval()
    reference = tmp_path / "exp" / "model_best.pth.tar"
    reference.parent.mkdir()
    torch.save(_reference_checkpoint(network), reference)
    ours = tmp_path / "ours.pth"
    save_checkpoint(ours, network.eval())  # the same weights with our meta: the expected results

    assert _raml_test(reference, cub_root, tmp_path / "reference.json") == 0
    assert _raml_test(ours, cub_root, tmp_path / "ours.json") == 0
    results = json.loads((tmp_path / "reference.json").read_text())
    assert set(results["cub-test"]) == {"sym"}
    metrics = results["cub-test"]["sym"]
    assert metrics["num_queries"] == 200 and 0.0 < metrics["mAP"] <= 100.0
    assert results == json.loads((tmp_path / "ours.json").read_text())


def test_raml_test_names_the_pool_flag_for_a_meta_less_spoc_checkpoint(
    cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(4)
    network = build_network("resnet18", pooling="spoc", whitening=16, pretrained=False)
    path = tmp_path / "spoc.pth.tar"
    torch.save(_reference_checkpoint(network), path)
    out = tmp_path / "results.json"
    assert _raml_test(path, cub_root, out) == 2
    error = capsys.readouterr().err
    assert "raml test: error:" in error and "--pool mac or --pool spoc" in error and "spoc.pth.tar" in error
    assert not out.exists()


def _meta_less_checkpoint(path: Path, pooling: str) -> Path:
    """A checkpoint as the reference's training writes it (``epoch`` and ``state_dict``, no ``meta``): its
    pooling cannot be told from the weights (mac and spoc have no parameters), so ``--pool`` decides it (at
    --image-size 64 the last feature map is 2x2, where mac and spoc differ)."""
    torch.manual_seed(5)
    network = build_network("resnet18", pooling=pooling, whitening=16, pretrained=False).eval()
    torch.save({"epoch": 1, "state_dict": network.state_dict()}, path)
    return path


def test_the_embedding_cache_keys_a_meta_less_checkpoint_by_the_pool_it_is_loaded_with(
    own_root: Path, tmp_path: Path
) -> None:
    checkpoint = _meta_less_checkpoint(tmp_path / "ref_mac.pth.tar", "mac")

    def extract(pool: str, name: str, *extra: str) -> np.ndarray:
        output = tmp_path / f"{name}.npy"
        args = ["extract", "--network-path", str(checkpoint), "--dataset", "mine-test", "--data-root", str(own_root)]
        args += ["--image-size", "64", "--pool", pool, "--device", "cpu", "--output", str(output), *extra]
        assert main(args) == 0
        return np.load(output)

    mac = extract("mac", "mac")
    spoc = extract("spoc", "spoc")  # before: the mac embeddings, read from the cache
    spoc_uncached = extract("spoc", "spoc_nocache", "--no-cache")
    assert np.array_equal(spoc, spoc_uncached)
    assert not np.allclose(mac, spoc)
    assert len(list((own_root / "cache" / "embeddings").glob("*.npy"))) == 2


def test_raml_test_caches_the_teacher_per_pool_of_a_meta_less_checkpoint(own_root: Path, tmp_path: Path) -> None:
    checkpoint = _meta_less_checkpoint(tmp_path / "ref_mac.pth.tar", "mac")

    def asym(pool: str, name: str, *extra: str) -> dict:
        out = tmp_path / f"{name}.json"
        args = ["test", "--student-path", str(checkpoint), "--teacher-path", str(checkpoint)]
        args += ["--datasets", "mine-test", "--data-root", str(own_root), "--image-size", "64", "--pool", pool]
        args += ["--teacher-image-size", "96"]  # not the default 448: small images are enough here
        assert (
            main(
                [
                    *args,
                    "--device",
                    "cpu",
                    "--cpu-runtime",
                    "torch",
                    "-j",
                    "0",
                    "--no-progress",
                    "--json",
                    str(out),
                    *extra,
                ]
            )
            == 0
        )
        return json.loads(out.read_text())["mine-test"]["asym"]

    asym("mac", "mac")
    spoc = asym("spoc", "spoc")  # before: the spoc queries against the mac database read from the cache
    assert spoc == asym("spoc", "spoc_nocache", "--no-cache")
