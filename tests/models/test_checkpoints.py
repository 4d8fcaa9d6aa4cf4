"""Checkpoint save/load in the reference format, safe loading, downloads and the model zoo."""

from __future__ import annotations

import functools
import http.server
import os
import pickle
import shutil
import subprocess
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from raml.models import (
    PUBLISHED_NETWORKS,
    CheckpointError,
    DownloadError,
    EmbeddingNetwork,
    build_network,
    checkpoint_sha256,
    infer_meta,
    load_checkpoint_file,
    load_network,
    network_from_checkpoint,
    resolve_network_path,
    save_checkpoint,
)
from raml.models import checkpoints as checkpoints_module
from raml.models.backbones import _torchvision_trunk
from raml.models.checkpoints import download_file, read_sha256sums
from raml.models.restricted_pickle import TorchScriptArchiveError, is_torchscript_archive, restricted_torch_load

# torchvision ResNet child name -> index in the reference's ``backbone`` Sequential.
_RESNET_CHILDREN = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
_MEAN = [0.485, 0.456, 0.406]
_STD = [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def network() -> EmbeddingNetwork:
    torch.manual_seed(0)
    return build_network("resnet18", pooling="gem", whitening=16, pretrained=False).eval()


def _reference_resnet(seed: int) -> torchvision.models.ResNet:
    torch.manual_seed(seed)
    resnet = torchvision.models.resnet18(weights=None)
    # Non-trivial BatchNorm statistics, so that a network left in training mode would be caught.
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    return resnet.eval()


def _reference_checkpoint(resnet: torchvision.models.ResNet, p: float, dim: int) -> dict:
    """A checkpoint laid out exactly like the reference implementation writes it."""
    state_dict = {}
    for key, value in resnet.state_dict().items():
        child, rest = key.split(".", 1)
        if child in _RESNET_CHILDREN:
            state_dict[f"backbone.{_RESNET_CHILDREN[child]}.{rest}"] = value.clone()
    generator = torch.Generator().manual_seed(5)
    state_dict["pool.p"] = torch.tensor([p])
    state_dict["whiten.weight"] = torch.randn(dim, 512, generator=generator) * 0.05
    state_dict["whiten.bias"] = torch.randn(dim, generator=generator) * 0.05
    whiten = torch.nn.Linear(512, dim)
    optimizer = torch.optim.Adam(whiten.parameters(), lr=1e-4)
    whiten(torch.rand(2, 512)).sum().backward()
    optimizer.step()
    return {
        "epoch": 20,
        "meta": {
            "architecture": "resnet18",
            "pooling": "gem",
            "whitening": True,
            "mean": list(_MEAN),
            "std": list(_STD),
            "outputdim": dim,
        },
        "state_dict": state_dict,
        "max_map": 0.4321,
        "optimizer": optimizer.state_dict(),
    }


def _manual_embedding(resnet: torchvision.models.ResNet, checkpoint: dict, x: torch.Tensor) -> np.ndarray:
    """Independent forward: torchvision layers one by one, GeM/normalise/linear/normalise in numpy."""
    with torch.no_grad():
        y = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
            y = layer(y)
    feature_map = y.double().numpy()
    state = checkpoint["state_dict"]
    p = float(state["pool.p"][0])
    weight = state["whiten.weight"].double().numpy()
    bias = state["whiten.bias"].double().numpy()
    rows = []
    for b in range(feature_map.shape[0]):
        pooled = np.array(
            [np.mean(np.maximum(feature_map[b, c], 1e-6) ** p) ** (1.0 / p) for c in range(feature_map.shape[1])]
        )
        pooled = pooled / (np.sqrt(np.sum(pooled**2)) + 1e-6)  # the reference's L2N adds eps to the norm
        whitened = weight @ pooled + bias
        rows.append(whitened / (np.sqrt(np.sum(whitened**2)) + 1e-6))
    return np.stack(rows)


def test_save_and_reload_gives_identical_embeddings(network: EmbeddingNetwork, tmp_path: Path) -> None:
    with torch.no_grad():
        network.pool.p.fill_(2.6)
    path = tmp_path / "net.pth"
    save_checkpoint(path, network)
    reloaded = load_network(path, data_root=tmp_path)
    assert not reloaded.training and reloaded.source_path == path
    assert reloaded.meta == network.meta
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), network(x), rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == [path]  # atomic save leaves no temporary file


def test_reference_format_checkpoint_matches_manual_forward(tmp_path: Path) -> None:
    resnet = _reference_resnet(seed=3)
    checkpoint = _reference_checkpoint(resnet, p=2.8, dim=24)
    path = tmp_path / "reference.pth"
    torch.save(checkpoint, path)

    loaded = load_network(str(path), data_root=tmp_path)
    assert loaded.output_dim == 24 and loaded.meta["whitening"] == 24
    assert loaded.mean == tuple(_MEAN) and loaded.std == tuple(_STD)
    assert not loaded.training

    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ours = loaded(x).double().numpy()
    np.testing.assert_allclose(ours, _manual_embedding(resnet, checkpoint, x), atol=1e-5)


def test_our_key_layout_equals_reference_layout(network: EmbeddingNetwork, tmp_path: Path) -> None:
    reference = _reference_checkpoint(_reference_resnet(seed=4), p=3.0, dim=16)
    path = tmp_path / "ours.pth"
    save_checkpoint(path, network, epoch=3, max_map=0.5, optimizer={"state": {}, "param_groups": []})
    ours = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours["state_dict"]) == list(reference["state_dict"])
    for key, value in reference["state_dict"].items():
        assert ours["state_dict"][key].shape == value.shape, key
    assert {"meta", "state_dict", "epoch", "max_map", "optimizer"} <= set(ours)
    assert set(reference["meta"]) <= set(ours["meta"])
    assert ours["epoch"] == 3 and ours["max_map"] == 0.5 and ours["scheduler"] is None
    assert isinstance(ours["meta"]["whitening"], int) and not isinstance(ours["meta"]["whitening"], bool)


def test_training_checkpoint_with_optimizer_and_scheduler_loads_weights_only(tmp_path: Path) -> None:
    network = build_network("test_resnet", pooling="gemmp", whitening=8, pretrained=False)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-4, total_steps=10, div_factor=10)
    network(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    scheduler.step()
    path = tmp_path / "train.pth"
    save_checkpoint(
        path,
        network,
        epoch=1,
        max_map=0.25,
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        extra={"args": {"lr": 1e-4, "sizes": (224, 448)}},
    )
    checkpoint = load_checkpoint_file(path)
    assert checkpoint["epoch"] == 1 and checkpoint["scheduler"]["last_epoch"] == 1
    optimizer.load_state_dict(checkpoint["optimizer"])
    rebuilt = network_from_checkpoint(checkpoint)
    assert rebuilt.meta["pooling"] == "gemmp" and rebuilt.output_dim == 8


def test_meta_holds_only_plain_types(network: EmbeddingNetwork, tmp_path: Path) -> None:
    network.meta["bad"] = torch.device("cpu")
    try:
        with pytest.raises(TypeError, match=r"meta\['bad'\].*plain Python values"):
            save_checkpoint(tmp_path / "x.pth", network)
    finally:
        del network.meta["bad"]
    assert not (tmp_path / "x.pth").exists()


def test_extra_cannot_overwrite_reserved_keys(network: EmbeddingNetwork, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved checkpoint keys"):
        save_checkpoint(tmp_path / "x.pth", network, extra={"state_dict": {}})


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_torch_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"meta": {"architecture": "resnet18"}, "state_dict": {}, "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="Refused to load .*evil.pth.* for safety"):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match="for safety"):
        load_network(path, data_root=tmp_path)
    assert not marker.exists()


def test_malicious_plain_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"meta": {}, "state_dict": {}, "payload": _Evil(marker)}, protocol=2)
    # The payload is real: unrestricted unpickling runs it (control for the test below).
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="for safety"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_garbage_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="garbage.pth.*is not a valid checkpoint"):
        load_checkpoint_file(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"meta": {"architecture": "resnet18"}}, r"lacks 'state_dict'; found keys \['meta'\]"),
        ({"model": {}}, r"lacks 'state_dict'; found keys \['model'\]"),
        ([1, 2], "not a checkpoint dict"),
    ],
)
def test_checkpoint_without_required_keys(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "partial.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_file(path)


def test_meta_without_architecture_is_rejected() -> None:
    with pytest.raises(CheckpointError, match=r"meta lacks \['architecture'\]"):
        network_from_checkpoint({"meta": {"pooling": "gem"}, "state_dict": {}}, source="x.pth")


def test_unknown_architecture_in_meta_is_rejected() -> None:
    with pytest.raises(CheckpointError, match="x.pth: cannot rebuild.*neither a torchvision"):
        network_from_checkpoint({"meta": {"architecture": "nonet", "pooling": "gem"}, "state_dict": {}}, "x.pth")


def test_mismatched_state_dict_lists_keys(network: EmbeddingNetwork) -> None:
    state_dict = dict(network.state_dict())
    del state_dict["pool.p"]
    state_dict["head.weight"] = torch.zeros(1)
    checkpoint = {"meta": dict(network.meta), "state_dict": state_dict}
    with pytest.raises(CheckpointError, match=r"missing keys \['pool.p'\], unexpected keys \['head.weight'\]"):
        network_from_checkpoint(checkpoint, source="bad.pth")


def test_data_parallel_prefix_is_accepted(network: EmbeddingNetwork) -> None:
    state_dict = {f"module.{k}": v for k, v in network.state_dict().items()}
    rebuilt = network_from_checkpoint({"meta": dict(network.meta), "state_dict": state_dict})
    torch.testing.assert_close(rebuilt.whiten.weight, network.whiten.weight)


def test_checkpoint_sha256(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    assert checkpoint_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_published_names() -> None:
    assert len(PUBLISHED_NETWORKS) == 9
    for dataset in ("cub", "cars", "sop"):
        for middle in ("448r", "224r", "S224r-T448r"):
            name = f"{dataset}-{middle}-resnet50-512-gem-w"
            assert PUBLISHED_NETWORKS[name] == f"http://ptak.felk.cvut.cz/personal/sumapave/public/{name}.pth"


# ---------------------------------------------------------------- resolution and download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass

    def do_GET(self) -> None:  # noqa: N802 - name required by BaseHTTPRequestHandler
        if self.path.startswith("/truncated"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # a 50 ms poll (the default is 0.5 s): shutdown() waits up to one poll, at each test's teardown
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_download_success(server: tuple[str, Path], tmp_path: Path) -> None:
    url, root = server
    (root / "file.bin").write_bytes(b"0123456789" * 1000)
    dest = tmp_path / "cache" / "file.bin"
    assert download_file(f"{url}/file.bin", dest, timeout=5) == dest
    assert dest.read_bytes() == b"0123456789" * 1000
    assert list(dest.parent.iterdir()) == [dest]


def test_download_404_is_clear_and_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    dest = tmp_path / "cache" / "missing.pth"
    with pytest.raises(DownloadError, match=r"Could not download .*/missing.pth .*404.*put it at .*missing.pth"):
        download_file(f"{url}/missing.pth", dest, timeout=5, retries=3, retry_wait=0)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_truncated_download_leaves_no_partial_file(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    dest = tmp_path / "cache" / "truncated.pth"
    with pytest.raises(DownloadError, match="truncated.pth"):
        download_file(f"{url}/truncated.pth", dest, timeout=5, retries=2, retry_wait=0)
    assert list(dest.parent.iterdir()) == []


def test_published_network_is_downloaded_into_cache(
    server: tuple[str, Path], tmp_path: Path, network: EmbeddingNetwork, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, root = server
    name = "cub-448r-resnet50-512-gem-w"
    save_checkpoint(root / f"{name}.pth", network)
    monkeypatch.setitem(checkpoints_module.PUBLISHED_NETWORKS, name, f"{url}/{name}.pth")
    data_root = tmp_path / "data"
    with pytest.raises(ValueError, match="downloading is off"):
        resolve_network_path(name, data_root, download=False)
    loaded = load_network(name, data_root=data_root, device=torch.device("cpu"))
    cached = data_root / "networks" / f"{name}.pth"
    assert loaded.source_path == cached and cached.is_file()
    (root / f"{name}.pth").unlink()  # the second time, the cache is used, not the server
    assert resolve_network_path(name, data_root) == cached


def test_resolve_existing_path_and_cached_name(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    cached = data_root / "networks" / "mynet.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_network_path("mynet", data_root) == cached
    assert resolve_network_path("mynet.pth", data_root) == cached
    assert resolve_network_path(cached, "elsewhere") == cached
    assert resolve_network_path(str(cached), "elsewhere") == cached


@pytest.mark.parametrize("name", ["cub-448r-resnet50", "exp/student.pth", "nonexistent"])
def test_unknown_network_lists_published_names(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a published network.*cub-448r-resnet50-512-gem-w, .*sop-S224r"):
        load_network(name, data_root=tmp_path, download=True)


def test_unknown_network_suggests_close_published_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Did you mean cub-448r-resnet50-512-gem-w"):
        resolve_network_path("cub-448r-resnet50-512-gem", tmp_path)


# ------------------------------------------------- training checkpoints of the reference (no meta)


def _reference_training_checkpoint(network: EmbeddingNetwork, pooling: str, old_torch: bool = False) -> dict:
    """What the reference's ``save_checkpoint`` writes after training ``network``: no ``meta``; the AdamW and
    OneCycleLR of its ``get_model_optimizer`` (GeM ``p`` at 10x lr without weight decay)."""
    lr = 1e-4
    groups = [{"params": network.backbone.parameters()}]
    if pooling == "gem":
        groups.append({"params": network.pool.parameters(), "lr": lr * 10, "weight_decay": 0})
    elif pooling == "gemmp":
        groups.append({"params": network.pool.parameters(), "lr": lr * 100, "weight_decay": 0})
    if network.whiten is not None:
        groups.append({"params": network.whiten.parameters()})
    optimizer = torch.optim.AdamW(groups, lr, weight_decay=1e-6)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, div_factor=10, steps_per_epoch=3, epochs=2)
    network.train()
    network(torch.rand(2, 3, 32, 32)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    network.eval()
    scheduler_state = scheduler.state_dict()
    max_map: object = 0.4321
    if old_torch:
        # PyTorch 1.12 (the reference's) kept OneCycleLR's annealing function as a bound method in its state
        # dict, pickled as getattr(<the scheduler object, with its optimizer>, name); the reference's mAP is a
        # numpy float. weights_only=True refuses both.
        scheduler_state["anneal_func"] = types.MethodType(torch.optim.lr_scheduler.OneCycleLR._annealing_cos, scheduler)
        max_map = np.float64(0.4321)
    return {
        "epoch": 2,
        "state_dict": network.state_dict(),
        "max_map": max_map,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler_state,
    }


@pytest.fixture(scope="module")
def reference_gem() -> tuple[EmbeddingNetwork, dict]:
    """A resnet18 GeM network trained one step, and its checkpoint as the reference's PyTorch 1.12 wrote it."""
    torch.manual_seed(7)
    trained = build_network("resnet18", pooling="gem", whitening=16, pretrained=False)
    return trained, _reference_training_checkpoint(trained, "gem", old_torch=True)


def _same_embeddings(a: EmbeddingNetwork, b: EmbeddingNetwork, size: int = 32) -> None:
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("old_torch", [False, True], ids=["torch2-state", "torch1.12-state"])
def test_reference_training_checkpoint_without_meta_loads(
    old_torch: bool, reference_gem: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trained, checkpoint = reference_gem
    if not old_torch:  # what the reference's save_checkpoint writes under today's PyTorch
        checkpoint = dict(checkpoint, max_map=float(checkpoint["max_map"]))
        checkpoint["scheduler"] = {k: v for k, v in checkpoint["scheduler"].items() if k != "anneal_func"}
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path)
    if old_torch:
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)

    with caplog.at_level("INFO", logger="raml.models.checkpoints"):
        loaded = load_network(path, data_root=tmp_path)
    assert loaded.meta["architecture"] == "resnet18" and loaded.meta["pooling"] == "gem"
    assert loaded.meta["whitening"] == 16 and loaded.output_dim == 16
    assert loaded.mean == tuple(_MEAN) and loaded.std == tuple(_STD)
    assert "has no 'meta'; inferred from its weights: architecture resnet18, pooling gem, whitening 16" in caplog.text
    _same_embeddings(loaded, trained)

    checkpoint = load_checkpoint_file(path)
    assert checkpoint["epoch"] == 2 and checkpoint["max_map"] == pytest.approx(0.4321)
    assert type(checkpoint["max_map"]) is float
    # The optimizer state is plain data and is kept: a resume can restore it.
    torch.optim.AdamW(
        [
            {"params": list(trained.backbone.parameters())},
            {"params": trained.pool.parameters()},
            {"params": trained.whiten.parameters()},
        ]
    ).load_state_dict(checkpoint["optimizer"])
    if old_torch:
        assert "scheduler" not in checkpoint
        warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"][-1]
        assert "restricted unpickler" in warning and "dropped ['scheduler']" in warning
        assert "torch.optim.lr_scheduler.OneCycleLR" in warning and "builtins.getattr" in warning
    else:
        assert checkpoint["scheduler"]["total_steps"] == 6 and checkpoint["scheduler"]["last_epoch"] == 1


def test_meta_less_gemmp_without_whitening(tmp_path: Path) -> None:
    torch.manual_seed(8)
    trained = build_network("resnet18", pooling="gemmp", whitening=0, pretrained=False)
    path = tmp_path / "gemmp.pth"
    torch.save(_reference_training_checkpoint(trained, "gemmp"), path)
    loaded = load_network(path, whitening=0)
    assert loaded.meta["pooling"] == "gemmp" and loaded.meta["whitening"] == 0 and loaded.output_dim == 512
    _same_embeddings(loaded, trained)


@pytest.mark.parametrize("pooling", ["mac", "spoc"])
def test_meta_less_mac_or_spoc_needs_the_pool_hint(pooling: str, tmp_path: Path) -> None:
    torch.manual_seed(9)
    trained = build_network("resnet18", pooling=pooling, whitening=8, pretrained=False)
    path = tmp_path / f"{pooling}.pth"
    torch.save(_reference_training_checkpoint(trained, pooling), path)
    with pytest.raises(CheckpointError, match=r"no 'meta' and no pool.p.*--pool mac or --pool spoc"):
        load_network(path)
    with pytest.raises(CheckpointError, match=r"its pooling cannot be 'gem'.*--pool mac or --pool spoc"):
        load_network(path, pooling="gem")
    loaded = load_network(path, pooling=pooling.upper())
    assert loaded.meta["pooling"] == pooling
    _same_embeddings(loaded, trained)


def test_hints_that_contradict_the_weights_are_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(10)
    trained = build_network("resnet18", pooling="gem", whitening=8, pretrained=False).eval()
    path = tmp_path / "gem.pth"
    torch.save({"state_dict": trained.state_dict()}, path)
    with caplog.at_level("WARNING", logger="raml.models.checkpoints"):
        loaded = load_network(path, pooling="spoc", whitening=512)
    assert loaded.meta["pooling"] == "gem" and loaded.output_dim == 8
    assert "ignoring the pooling hint 'spoc'" in caplog.text and "ignoring the whitening hint 512" in caplog.text


def test_hints_are_not_used_when_meta_is_present(network: EmbeddingNetwork, tmp_path: Path) -> None:
    path = tmp_path / "ours.pth"
    save_checkpoint(path, network)
    assert load_network(path, pooling="mac", whitening=3, architecture="resnet50").meta == network.meta


_RESNET_FAMILY = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


@pytest.mark.parametrize("name", _RESNET_FAMILY)
def test_resnet_architecture_is_inferred_from_the_weights(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        trunk = _torchvision_trunk(name, torchvision.models.get_model(name))
    state_dict = {f"backbone.{k}": v for k, v in trunk.state_dict().items()}
    state_dict["pool.p"] = torch.ones(1)
    state_dict["whiten.weight"] = torch.empty(24, 2048 if name not in ("resnet18", "resnet34") else 512, device="meta")
    meta = infer_meta(state_dict, "x.pth")
    assert meta == {
        "architecture": name,
        "pooling": "gem",
        "whitening": 24,
        "mean": _MEAN,
        "std": _STD,
    }


def test_unrecognised_meta_less_backbone_is_refused_with_the_way_out(tmp_path: Path) -> None:
    torch.manual_seed(11)
    trained = build_network("test_resnet", pooling="gem", whitening=4, pretrained=False).eval()
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": trained.state_dict(), "epoch": 1}, path)
    with pytest.raises(
        CheckpointError, match=r"timm.pth has no 'meta'.*not those of a torchvision ResNet.*architecture="
    ):
        load_network(path)
    loaded = load_network(path, architecture="test_resnet")
    assert loaded.meta["architecture"] == "test_resnet"
    _same_embeddings(loaded, trained, size=32)


def test_truncated_resnet_is_not_mistaken_for_another_depth() -> None:
    with torch.device("meta"):
        trunk = _torchvision_trunk("resnet34", torchvision.models.resnet34())
    state_dict = {f"backbone.{k}": v for k, v in trunk.state_dict().items() if not k.startswith("6.5.")}
    with pytest.raises(CheckpointError, match="not those of a torchvision ResNet"):
        infer_meta(state_dict, "x.pth", pooling="mac")


def test_state_dict_that_does_not_fit_its_meta_is_a_clear_error(network: EmbeddingNetwork) -> None:
    state_dict = dict(network.state_dict())
    meta = dict(network.meta, pooling="gemmp")  # gemmp needs 512 values of p, the file has one
    with pytest.raises(
        CheckpointError, match=r"bad.pth: the state dict does not fit a 'resnet18' network with 'gemmp'"
    ):
        network_from_checkpoint({"meta": meta, "state_dict": state_dict}, source="bad.pth")


def test_reference_timm_key_layout_loads(tmp_path: Path) -> None:
    """The reference keeps a timm backbone unwrapped: ``backbone.<timm key>``; ours is ``backbone.model.*``."""
    torch.manual_seed(12)
    trained = build_network("test_resnet", pooling="gem", whitening=4, pretrained=False).eval()
    state_dict = {k.replace("backbone.model.", "backbone.", 1): v for k, v in trained.state_dict().items()}
    meta = {"architecture": "test_resnet", "pooling": "gem", "whitening": 4, "mean": _MEAN, "std": _STD}
    path = tmp_path / "timm_reference.pth"
    torch.save({"meta": meta, "state_dict": state_dict}, path)
    _same_embeddings(load_network(path), trained, size=32)


def test_restricted_loading_still_refuses_code(reference_gem: tuple, tmp_path: Path) -> None:
    """A payload next to genuine old training state: the numpy/scheduler parts alone would be loadable."""
    marker = tmp_path / "pwned"
    checkpoint = dict(reference_gem[1])
    checkpoint["scheduler"] = dict(checkpoint["scheduler"], hook=_Evil(marker))
    path = tmp_path / "evil_training.pth"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"Refused to load .*evil_training.pth.* for safety.*(posix|os)\.system"):
        load_network(path)
    assert not marker.exists()


def test_training_objects_inside_the_state_dict_are_refused(reference_gem: tuple, tmp_path: Path) -> None:
    checkpoint = dict(reference_gem[1])
    checkpoint["state_dict"] = dict(checkpoint["state_dict"], **{"pool.p": checkpoint["scheduler"]["anneal_func"]})
    path = tmp_path / "odd.pth"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="for safety.*'state_dict' is not a dict of tensors"):
        load_checkpoint_file(path)


def test_restricted_loading_reports_corrupt_files(reference_gem: tuple, tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    torch.save(reference_gem[1], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*is not a valid checkpoint"):
        load_checkpoint_file(path)


# ------------------------------------------------------------------------- SHA-256 of published files


@pytest.fixture
def fake_zoo(tmp_path: Path, network: EmbeddingNetwork, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``download_file`` replaced by a copy of a local checkpoint; counts the downloads."""
    source = tmp_path / "served.pth"
    save_checkpoint(source, network)
    calls: list[str] = []

    def fake_download(url: str, dest: str | Path, **kwargs: object) -> Path:
        calls.append(url)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(source.read_bytes())
        return Path(dest)

    monkeypatch.setattr(checkpoints_module, "download_file", fake_download)
    name = "cars-224r-resnet50-512-gem-w"
    return {"name": name, "source": source, "calls": calls, "root": tmp_path / "data"}


def test_first_download_records_sha256_and_later_loads_verify_it(fake_zoo: dict) -> None:
    name, root = fake_zoo["name"], fake_zoo["root"]
    loaded = load_network(name, data_root=root)
    cached = root / "networks" / f"{name}.pth"
    sums = root / "networks" / "SHA256SUMS"
    digest = checkpoint_sha256(fake_zoo["source"])
    assert sums.read_text() == f"{digest}  {name}.pth\n"
    assert sorted(p.name for p in cached.parent.iterdir()) == ["SHA256SUMS", f"{name}.pth"]
    if shutil.which("sha256sum"):  # the file is in sha256sum's own format
        subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=cached.parent, check=True)

    assert load_network(name, data_root=root).meta == loaded.meta  # verified, not downloaded again
    assert resolve_network_path(cached, "elsewhere") == cached  # by path too
    assert len(fake_zoo["calls"]) == 1


def test_changed_published_file_is_a_clear_error(fake_zoo: dict) -> None:
    name, root = fake_zoo["name"], fake_zoo["root"]
    load_network(name, data_root=root)
    cached = root / "networks" / f"{name}.pth"
    recorded = checkpoint_sha256(cached)
    with open(cached, "ab") as f:
        f.write(b"\0")
    changed = checkpoint_sha256(cached)
    pattern = rf"{name}.pth is not the file that was downloaded: its SHA-256 is {changed}, but {recorded} .*Delete"
    for target in (name, cached):
        with pytest.raises(CheckpointError, match=pattern):
            load_network(target, data_root=root)
    cached.unlink()  # the fix the message gives
    load_network(name, data_root=root)
    assert len(fake_zoo["calls"]) == 2


def test_published_file_placed_by_hand_is_recorded_on_first_use(fake_zoo: dict) -> None:
    name, root = fake_zoo["name"], fake_zoo["root"]
    cached = root / "networks" / f"{name}.pth"
    cached.parent.mkdir(parents=True)
    shutil.copy(fake_zoo["source"], cached)
    (cached.parent / "SHA256SUMS").write_text(f"{'a' * 64}  other.pth\nnot a checksum line\n")
    assert resolve_network_path(name, root) == cached
    assert read_sha256sums(cached.parent) == {"other.pth": "a" * 64, f"{name}.pth": checkpoint_sha256(cached)}
    assert fake_zoo["calls"] == []


def test_own_networks_in_the_cache_folder_are_not_hashed(tmp_path: Path, network: EmbeddingNetwork) -> None:
    path = tmp_path / "networks" / "mine.pth"
    save_checkpoint(path, network)
    load_network("mine", data_root=tmp_path)
    assert not (tmp_path / "networks" / "SHA256SUMS").exists()


def _torchscript_archive(path: Path) -> Path:
    torch.jit.save(torch.jit.script(nn_identity()), str(path))
    return path


def nn_identity() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 2))


@pytest.fixture()
def no_jit_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch.jit.load replaced by a recorder that loads nothing: a test asserts it was never called."""
    calls: list[str] = []

    def refuse(source: object, *args: object, **kwargs: object) -> None:
        calls.append(str(source))
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    return calls


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_torchscript_archive_is_refused_before_any_load(tmp_path: Path, no_jit_load: list[str]) -> None:
    path = _torchscript_archive(tmp_path / "scripted.pth")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"scripted.pth.*is a TorchScript archive .*torch.save"):
        load_checkpoint_file(path)
    with pytest.raises(TorchScriptArchiveError, match="TorchScript archive"):
        restricted_torch_load(path)  # the restricted loader refuses it on its own too
    assert no_jit_load == [] and path.read_bytes() == before
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    with open(plain, "rb") as handle:
        assert is_torchscript_archive(handle) is None and handle.tell() == 0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_file_swapped_for_a_torchscript_archive_between_the_two_reads_is_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_jit_load: list[str]
) -> None:
    # a reference-style checkpoint: its numpy max_map sends it to the restricted second read
    path = tmp_path / "reference.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "max_map": np.float64(0.5)}, path)
    scripted = _torchscript_archive(tmp_path / "scripted.pth")
    real_load = torch.load
    loads: list[bool] = []

    def load_then_swap(*args: object, **kwargs: object) -> object:
        loads.append(bool(kwargs.get("weights_only")))
        try:
            return real_load(*args, **kwargs)
        finally:
            if len(loads) == 1:
                os.replace(scripted, path)  # between the weights-only read and the restricted one

    monkeypatch.setattr(torch, "load", load_then_swap)
    checkpoint = load_checkpoint_file(path)
    assert loads == [True, False] and no_jit_load == []
    assert checkpoint["max_map"] == 0.5 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(2))
