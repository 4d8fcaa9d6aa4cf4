"""Multi-scale embeddings: the scale parser, the arithmetic (against a loop over scales and images), the power."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raml.data.image_limits import DEFAULT_MAX_PIXELS
from raml.data.images import EvalTransform, load_image
from raml.models import build_network
from raml.retrieval.extract import (
    SINGLE_SCALE,
    embed_batch,
    extract_embeddings,
    multiscale_power,
    parse_scales,
    validate_scales,
)
from raml.retrieval.scales import check_scaled_size

CPU = torch.device("cpu")
REFERENCE_EXAMPLES = {
    "[1]": (1.0,),
    "[1, 1/2**(1/2), 1/2]": (1.0, 2**-0.5, 0.5),
    "[1, 2**(1/2), 1/2**(1/2)]": (1.0, 2**0.5, 2**-0.5),
}


@pytest.mark.parametrize(("text", "expected"), list(REFERENCE_EXAMPLES.items()))
def test_parse_scales_reads_the_reference_examples(text: str, expected: tuple[float, ...]) -> None:
    got = parse_scales(text)
    assert isinstance(got, tuple) and all(type(s) is float for s in got)
    assert got == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(1, 0.5)", (1.0, 0.5)),
        ("1, 0.5", (1.0, 0.5)),
        ("0.75", (0.75,)),
        (" [ 1 ,  .5 ] ", (1.0, 0.5)),
        ("[2**-1]", (0.5,)),
        ("[-(-2)]", (2.0,)),
        ("[+1, 3/4*2 - 1, 1e-1]", (1.0, 0.5, 0.1)),
        ("[1, 1]", (1.0, 1.0)),
    ],
)
def test_parse_scales_accepts_arithmetic_on_numbers(text: str, expected: tuple[float, ...]) -> None:
    assert parse_scales(text) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not a list of scales"),
        ("[]", "at least one scale"),
        ("()", "at least one scale"),
        ("[0]", "positive finite"),
        ("[1, -0.5]", "positive finite"),
        ("[1e400]", "positive finite"),
        ("[1e400 - 1e400]", "positive finite"),  # nan
        ("[x]", "'x'.*not allowed"),
        ("__import__('os').system('true')", "not allowed"),
        ("[abs(-1)]", "not allowed"),
        ("[True]", "not allowed"),
        ("[1j]", "not allowed"),
        ("['1']", "not allowed"),
        ("[[1]]", "not allowed"),
        ("{1}", "not allowed"),
        ("[1 // 2]", "not allowed"),
        ("[1 % 2]", "not allowed"),
        ("lambda: 1", "not allowed"),
        ("[1,,]", "not a list of scales"),
        ("[1]; import os", "not a list of scales"),
        ("[1/0]", "divides by zero"),
        ("[10**10**10]", "too large"),
        ("[(-8)**(1/3)]", "not a real number"),
        ("[" + "1," * 600 + "]", "longer than"),
    ],
)
def test_parse_scales_refuses_everything_else(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_scales(text)


def test_validate_scales_refuses_bad_sequences() -> None:
    assert validate_scales([1, 0.5]) == (1.0, 0.5)
    for bad in ("1", 1.0, [], [float("nan")], [float("inf")], [0.0]):
        with pytest.raises(ValueError):
            validate_scales(bad)  # type: ignore[arg-type]


def _gem_network(p: float) -> torch.nn.Module:
    torch.manual_seed(0)
    network = build_network("resnet18", pooling="gem", whitening=0, pretrained=False).eval()
    with torch.no_grad():
        network.pool.p.fill_(p)
    return network


def test_multiscale_power_is_gem_p_only_for_gem_without_whitening() -> None:
    gem = _gem_network(2.5)
    assert multiscale_power(gem, (1.0, 0.5)) == pytest.approx(2.5)
    assert multiscale_power(gem, (1.0,)) == 1.0  # one scale: a plain mean, as the reference
    assert multiscale_power(gem, (0.5,)) == 1.0
    whitened = build_network("resnet18", pooling="gem", whitening=8, pretrained=False)
    assert multiscale_power(whitened, (1.0, 0.5)) == 1.0
    for pooling in ("mac", "spoc", "gemmp"):
        assert multiscale_power(build_network("resnet18", pooling=pooling, whitening=0, pretrained=False), (1, 2)) == 1


def _loop_multiscale(network: torch.nn.Module, images: torch.Tensor, scales, power: float) -> torch.Tensor:
    """One image and one scale at a time, with plain Python sums: the definition, slowly."""
    rows = []
    for b in range(images.shape[0]):
        image = images[b : b + 1]
        total = None
        for scale in scales:
            x = image if scale == 1 else F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
            v = network(x)[0].double()
            term = torch.tensor([float(c) ** power for c in v], dtype=torch.float64)
            total = term if total is None else total + term
        mean = total / len(scales)
        v = torch.tensor([float(c) ** (1.0 / power) for c in mean], dtype=torch.float64)
        norm = math.sqrt(sum(float(c) ** 2 for c in v))
        rows.append(v / norm)
    return torch.stack(rows).float()


@pytest.mark.parametrize(
    ("whitening", "scales"),
    [(0, (1.0, 2**-0.5, 0.5)), (0, (1.0, 2**0.5, 2**-0.5)), (8, (1.0, 0.5)), (0, (0.75,))],
)
@torch.inference_mode()
def test_embed_batch_matches_a_loop_over_scales_and_images(whitening: int, scales) -> None:
    torch.manual_seed(1)
    network = build_network("resnet18", pooling="gem", whitening=whitening, pretrained=False).eval()
    with torch.no_grad():
        network.pool.p.fill_(2.5)  # not the initial 3: the learned p must be the one used
    images = torch.randn(3, 3, 64, 64)
    power = multiscale_power(network, scales)
    assert power == (2.5 if whitening == 0 and len(scales) > 1 else 1.0)
    got = embed_batch(network, images, scales, power)
    expected = _loop_multiscale(network, images, scales, power)
    assert got.shape == (3, network.output_dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))
    # and the power matters: a plain mean over scales gives other embeddings when p != 1
    if power != 1.0:
        assert not torch.allclose(embed_batch(network, images, scales, 1.0), got, atol=1e-4)


@torch.inference_mode()
def test_single_scale_is_the_network_itself() -> None:
    network = _gem_network(3.0)
    images = torch.randn(2, 3, 48, 48)
    assert torch.equal(embed_batch(network, images, SINGLE_SCALE), network(images))


@torch.inference_mode()
def test_embed_batch_refuses_a_scale_below_one_pixel_and_a_bad_power() -> None:
    network = _gem_network(3.0)
    with pytest.raises(ValueError, match="less than one pixel"):
        embed_batch(network, torch.randn(1, 3, 8, 8), (1.0, 0.1))
    with pytest.raises(ValueError, match="power"):
        embed_batch(network, torch.randn(1, 3, 8, 8), (1.0, 0.5), power=0.0)


def test_extract_embeddings_multiscale_equals_per_image_loop(cub_root: Path) -> None:
    network = _gem_network(2.0)
    paths = sorted((cub_root / "cub" / "images").rglob("*.jpg"))[:5]
    scales = (1.0, 0.5, 2**0.5)
    got = extract_embeddings(network, paths, 48, CPU, batch_size=2, progress=False, scales=scales)
    transform = EvalTransform(48, network.mean, network.std)
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.inference_mode():
        expected = _loop_multiscale(network, images, scales, 2.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    single = extract_embeddings(network, paths, 48, CPU, batch_size=2, progress=False)
    assert not torch.allclose(single, got, atol=1e-4)


def test_a_scale_past_the_pixel_limit_is_refused_before_any_work(tmp_path: Path) -> None:
    limit = DEFAULT_MAX_PIXELS
    side = math.isqrt(limit)
    check_scaled_size((1.0, side / 64), 64, limit)  # floor(64 * side / 64) = side: fits
    with pytest.raises(ValueError, match=r"scale 400 .* 25600x25600 .* at image size 64 use scales of at most 98\.8"):
        check_scaled_size((1.0, 400.0), 64, limit)
    check_scaled_size((1.0, 0.5), 10_000, limit)  # scales up to 1 never enlarge
    # the library refuses it before any image is read (the paths do not exist)
    with pytest.raises(ValueError, match="over the limit"):
        extract_embeddings(_gem_network(2.0), [tmp_path / "missing.jpg"], 64, CPU, progress=False, scales=(1, 400))
    with torch.inference_mode(), pytest.raises(ValueError, match="over the limit"):
        embed_batch(_gem_network(2.0), torch.zeros(1, 3, 8, 8), (1.0, 1000.0))
