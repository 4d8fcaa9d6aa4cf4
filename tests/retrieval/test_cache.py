"""The embedding cache key changes with everything the embeddings depend on, the image files included."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raml.data.splits import get_split
from raml.models import build_network
from raml.retrieval.cache import MISSING, EmbeddingCache, cache_key, file_stamps
from raml.retrieval.extract import extract_embeddings

CPU = torch.device("cpu")


def test_key_depends_on_network_size_split_paths_scales_and_stamps():
    base = cache_key("abc", 448, "cub-test", ["a.jpg", "b.jpg"])
    assert base == cache_key("abc", 448, "cub-test", ["a.jpg", "b.jpg"])
    assert base == cache_key("abc", 448, "cub-test", ["a.jpg", "b.jpg"], scales=(1,))
    assert base != cache_key("abd", 448, "cub-test", ["a.jpg", "b.jpg"])
    assert base != cache_key("abc", 224, "cub-test", ["a.jpg", "b.jpg"])
    assert base != cache_key("abc", 448, "cub-val", ["a.jpg", "b.jpg"])
    assert base != cache_key("abc", 448, "cub-test", ["b.jpg", "a.jpg"])
    assert base != cache_key("abc", 448, "cub-test", ["a.jpg"])
    assert base != cache_key("abc", 448, "cub-test", ["a.jpg", "b.jpg"], scales=(1, 0.5))
    assert cache_key("abc", 448, "x", ["a"], scales=(1, 0.5)) != cache_key("abc", 448, "x", ["a"], scales=(0.5, 1))
    stamped = cache_key("abc", 448, "cub-test", ["a.jpg", "b.jpg"], stamps=["1:2", "3:4"])
    assert stamped != base
    assert stamped != cache_key("abc", 448, "cub-test", ["a.jpg", "b.jpg"], stamps=["1:2", "3:5"])
    with pytest.raises(ValueError, match="one stamp per path"):
        cache_key("abc", 448, "cub-test", ["a.jpg", "b.jpg"], stamps=["1:2"])


def test_key_depends_on_the_network_configuration_it_was_loaded_with():
    mac = {"architecture": "resnet18", "pooling": "mac", "whitening": 16, "outputdim": 16}
    key = cache_key("abc", 448, "cub-test", ["a.jpg"], network_meta=mac)
    assert key == cache_key("abc", 448, "cub-test", ["a.jpg"], network_meta=dict(reversed(list(mac.items()))))
    assert key != cache_key("abc", 448, "cub-test", ["a.jpg"], network_meta={**mac, "pooling": "spoc"})
    assert key != cache_key("abc", 448, "cub-test", ["a.jpg"], network_meta={**mac, "whitening": 0})
    assert key != cache_key("abc", 448, "cub-test", ["a.jpg"])


def test_file_stamps_size_mtime_or_content(tmp_path: Path, caplog):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"x" * 10)
    os.utime(a, ns=(1_000_000_000, 1_000_000_123))
    os.utime(b, ns=(1_000_000_000, 1_000_000_123))
    assert file_stamps([a, b]) == ["10:1000000123", "10:1000000123"]
    content = file_stamps([a, b], content_hash=True)
    assert content[0] == content[1] and content[0].startswith("sha256:")
    b.write_bytes(b"y" * 10)
    os.utime(b, ns=(1_000_000_000, 1_000_000_123))  # same size, same time: only the content tells
    assert file_stamps([a, b])[1] == file_stamps([a])[0]
    assert file_stamps([b], content_hash=True)[0] != content[0]
    assert file_stamps([tmp_path / "gone.bin"]) == [MISSING]
    assert "could not be read" in caplog.text


def test_get_or_compute_stores_once_and_ignores_bad_entries(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    for name in ("p", "q"):
        (tmp_path / name).write_bytes(name.encode())
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(2, 3)

    a = cache.get_or_compute("sha", 32, "x-test", ["p", "q"], compute, network_meta=None, root=tmp_path)
    b = cache.get_or_compute("sha", 32, "x-test", ["p", "q"], compute, network_meta=None, root=tmp_path)
    assert len(calls) == 1 and torch.equal(a, b)
    # a corrupt entry (wrong row count) is recomputed, not trusted
    (entry,) = (tmp_path / "cache").glob("*.npy")
    np.save(entry, np.zeros((5, 3), dtype=np.float32))
    cache.get_or_compute("sha", 32, "x-test", ["p", "q"], compute, network_meta=None, root=tmp_path)
    assert len(calls) == 2
    # other scales: another entry
    cache.get_or_compute("sha", 32, "x-test", ["p", "q"], compute, network_meta=None, root=tmp_path, scales=(1, 0.5))
    assert len(calls) == 3 and len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert not list((tmp_path / "cache").glob("*.tmp"))


def _rewrite_in_place(path: Path, keep_stat: bool = False) -> None:
    """Regenerate ``path`` under the same name with other pixels (the colours inverted).

    ``keep_stat``: then give it the old size and modification time back, as ``cp -p`` of a same-sized file
    would (the bytes are cut or padded; only the stamps are looked at then, not the pixels).
    """
    before, old_bytes = path.stat(), path.read_bytes()
    with Image.open(path) as img:
        pixels = 255 - np.asarray(img.convert("RGB"))
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="JPEG")
    if keep_stat:
        path.write_bytes(path.read_bytes()[: before.st_size].ljust(before.st_size, b"\0"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert path.read_bytes() != old_bytes


def _lookup(cache: EmbeddingCache, split, compute, content_hash: bool) -> torch.Tensor:  # noqa: ANN001
    """The split's embeddings at 32 px through the cache (stamps by size and mtime, or by content)."""
    return cache.get_or_compute(
        "sha",
        32,
        split.name,
        list(split.paths),
        compute,
        network_meta=None,
        root=split.root,
        content_hash=content_hash,
    )


@pytest.mark.parametrize("content_hash", [False, True])
def test_an_image_rewritten_in_place_is_re_embedded(sop_root: Path, tmp_path: Path, content_hash: bool):
    split = get_split("sop-test", sop_root)
    torch.manual_seed(0)
    network = build_network("resnet18", whitening=8, pretrained=False).eval()
    cache = EmbeddingCache(tmp_path / "cache")
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return extract_embeddings(network, split.abspaths(), 32, CPU, batch_size=8, progress=False)

    def lookup() -> torch.Tensor:
        return _lookup(cache, split, compute, content_hash)

    first = lookup()
    assert torch.equal(lookup(), first) and len(calls) == 1  # unchanged files: the cache is reused
    changed = 7
    _rewrite_in_place(split.root / split.paths[changed])
    second = lookup()
    assert len(calls) == 2, "the stale entry was reused"
    differs = (second - first).abs().amax(dim=1) > 1e-6
    assert differs.nonzero().flatten().tolist() == [changed]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_content_hash_sees_a_rewrite_that_keeps_size_and_mtime(sop_root: Path, tmp_path: Path):
    split = get_split("sop-test", sop_root)
    cache = EmbeddingCache(tmp_path / "cache")
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.full((len(split), 2), float(len(calls)))

    def lookup(content_hash: bool) -> torch.Tensor:
        return _lookup(cache, split, compute, content_hash)

    lookup(False), lookup(True)
    assert len(calls) == 2
    _rewrite_in_place(split.root / split.paths[3], keep_stat=True)
    lookup(False)
    assert len(calls) == 2  # the documented limit of size+mtime stamps
    lookup(True)
    assert len(calls) == 3
