"""Checkpoint save/load in the reference format, safe loading, downloads and the model zoo."""

from __future__ import annotations

import functools
import http.server
import os
import pickle
import threading
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
    load_checkpoint_file,
    load_network,
    network_from_checkpoint,
    resolve_network_path,
    save_checkpoint,
)
from raml.models import checkpoints as checkpoints_module
from raml.models.checkpoints import download_file

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
        pooled = pooled / np.sqrt(np.sum(pooled**2))
        whitened = weight @ pooled + bias
        rows.append(whitened / np.sqrt(np.sum(whitened**2)))
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
        ({"state_dict": {}}, r"lacks \['meta'\]; found keys \['state_dict'\]"),
        ({"model": {}}, r"lacks \['meta', 'state_dict'\]"),
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
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
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
