"""The opt-in bf16 extraction path (issue 21, item 3) and ``raml bench extract``'s comparison with the
reference's loader (item 2), on tiny networks and images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raml.data.images import EvalTransform, load_image
from raml.models import build_network
from raml.retrieval.extract import Bf16Forward, bf16_support, check_precision, extract_embeddings

ARCH = "timm/test_resnet"


def _images(folder: Path, count: int = 5) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(ARCH, pooling="gem", whitening=16, pretrained=False).eval()


def test_bf16_extraction_is_autocast_of_the_fp32_network(network: torch.nn.Module, tmp_path: Path) -> None:
    paths = _images(tmp_path)
    fp32 = extract_embeddings(network, paths, 32, torch.device("cpu"), batch_size=2, progress=False)
    bf16 = extract_embeddings(network, paths, 32, torch.device("cpu"), batch_size=2, progress=False, precision="bf16")
    # the same computation written plainly: bfloat16 autocast of the forward, L2-normalised in fp32 afterwards
    transform = EvalTransform(32, network.meta["mean"], network.meta["std"])
    batch = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = network(batch.contiguous(memory_format=torch.channels_last))
    plain = F.normalize(plain.float(), dim=1)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    torch.testing.assert_close(bf16, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(bf16.norm(dim=1), torch.ones(len(paths)), rtol=0, atol=1e-6)
    assert 0 < float((bf16 - fp32).abs().max()) < 0.1  # reduced precision: close to fp32, not equal


def test_bf16_on_the_cpu_hands_the_network_a_channels_last_batch_under_autocast() -> None:
    """oneDNN's bf16 convolutions run on NHWC: the wrapper reorders the batch once (the caller's tensor is left as
    it is) and the network runs under bfloat16 autocast; the output is normalised in fp32."""
    seen: list[tuple[bool, bool]] = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((x.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu")))
            return F.linear(x.flatten(1), torch.ones(3, x[0].numel()))  # bf16 under autocast

    images = torch.randn(2, 3, 8, 8)
    out = Bf16Forward(Probe(), "cpu")(images)
    assert seen == [(True, True)] and images.is_contiguous()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), rtol=0, atol=1e-6)


def test_precision_is_checked_and_emulated_bf16_is_announced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        check_precision("fp16", torch.device("cpu"))
    import raml.retrieval.extract as extract_module

    monkeypatch.setattr(extract_module, "bf16_support", lambda device: (False, "the CPU has neither flag"))
    with caplog.at_level(logging.WARNING):
        check_precision("bf16", torch.device("cpu"))
    assert "bf16 requested: the CPU has neither flag" in caplog.text and "expect no speed-up" in caplog.text


@pytest.mark.parametrize(
    ("flags", "native", "text"),
    [
        ("fpu sse avx2 fma", False, "neither avx512_bf16 nor amx_bf16"),
        ("fpu avx512f avx512_bf16 avx2", True, "avx512_bf16"),
        ("fpu amx_bf16 amx_tile avx512_bf16", True, "avx512_bf16 and amx_bf16"),
    ],
)
def test_bf16_support_reads_the_cpu_flags(tmp_path: Path, flags: str, native: bool, text: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    ok, reason = bf16_support(cpuinfo=cpuinfo)
    assert ok is native and text in reason
    assert bf16_support(cpuinfo=tmp_path / "missing") == (False, f"cannot read {tmp_path / 'missing'} to find "
                                                          "the CPU's bf16 support; assuming none")  # fmt: skip


def test_bench_extract_tiny_matches_the_reference_loader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from raml.bench.extract import main, make_jpegs, reference_embeddings

    out = tmp_path / "extract.json"
    argv = ["--num-images", "3", "--sizes", "40", "--batch-size", "2", "--workers", "0", "--bf16", "--json", str(out)]
    assert main([*argv, "--architecture", ARCH, "--cpu-runtime", "onnxruntime"]) == 0
    result = json.loads(out.read_text())
    entry = result["sizes"]["40"]
    assert result["network"].startswith(ARCH) and entry["runtime"] == "onnxruntime"
    # raml extract's embeddings are the reference loader's, through onnxruntime and through PyTorch
    assert entry["max_abs_diff"] <= 1e-4 and entry["torch_max_abs_diff"] <= 1e-4
    assert entry["reference_ips"] > 0 and entry["raml_ips"] > 0 and entry["raml_bf16_ips"] > 0
    assert entry["raml_torch_ips"] > 0 and entry["raml_export_s"] > 0  # the export is timed, and inside raml_ips
    assert entry["speedup_without_export"] > entry["speedup"]
    assert 0 < entry["bf16_max_abs_diff"] < 0.1
    assert set(entry["stages"]) == {"decode", "resize", "crop_tensor_normalise", "forward"}
    assert result["workers"] == 0 and isinstance(result["bf16_native"], bool) and result["bf16_note"]
    assert "40 px: reference" in capsys.readouterr().out
    # the reference side itself against a plain loop over PIL + the reference's rounding
    paths = make_jpegs(tmp_path / "jpegs", 2, seed=1)
    sizes = [Image.open(p).size for p in paths]
    assert all(300 <= w <= 500 and 300 <= h <= 500 for w, h in sizes)
    torch.manual_seed(0)
    net = build_network(ARCH, pooling="gem", whitening=16, pretrained=False).eval()
    got = reference_embeddings(net, paths, 40, batch_size=2, workers=0)
    mean = torch.tensor(net.meta["mean"]).view(3, 1, 1)
    std = torch.tensor(net.meta["std"]).view(3, 1, 1)
    batch = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        ratio = (40 + 40 / 7) / min(img.size)
        img = img.resize((round(img.size[0] * ratio), round(img.size[1] * ratio)), Image.Resampling.LANCZOS)
        left, top = round((img.size[0] - 40) / 2), round((img.size[1] - 40) / 2)
        crop = np.asarray(img.crop((left, top, left + 40, top + 40)), dtype=np.float32) / 255.0
        batch.append((torch.from_numpy(crop).permute(2, 0, 1) - mean) / std)
    with torch.no_grad():
        expected = net(torch.stack(batch))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
