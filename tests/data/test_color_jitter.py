"""The reference's colour jitter: every operation equals torchvision's PIL functional op, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from raml.data.color_jitter import color_jitter, hue_shift, jitter_pixels

_TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _smooth(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(1, height // 12), max(1, width // 12), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def _noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _special_colours() -> Image.Image:
    """Greys, primaries, secondaries and ties between the largest channels (PIL's sector rule), black, white."""
    levels = [0, 1, 2, 17, 40, 127, 128, 200, 254, 255]
    colours = [(a, b, c) for a in levels for b in levels for c in levels]
    return Image.fromarray(np.array(colours, dtype=np.uint8).reshape(10, 100, 3))


IMAGES = {
    "smooth-224": _smooth(224, 224, 0),
    "smooth-64x48": _smooth(64, 48, 1),
    "noise": _noise(96, 80, 2),
    "special": _special_colours(),
}


def _identity_factors(op: int, value: float) -> list[float]:
    factors = [1.0, 1.0, 1.0, 0.0]
    factors[op] = value
    return factors


@pytest.mark.parametrize("name", sorted(IMAGES))
@pytest.mark.parametrize("op", [0, 1, 2])
@pytest.mark.parametrize("factor", [0.6, 0.7531, 0.99, 1.01, 1.2468, 1.4])
def test_brightness_contrast_saturation_equal_torchvision(name, op, factor):
    img = IMAGES[name]
    expected = np.asarray(_TV_OPS[op](img, factor))
    got = np.asarray(color_jitter(img, *_identity_factors(op, factor)))
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("name", sorted(IMAGES))
@pytest.mark.parametrize("hue", [-0.1, -0.0631, -0.003, 0.0021, 0.05, 0.0999, 0.1, 0.5, -0.5])
def test_hue_equals_torchvision(name, hue):
    img = IMAGES[name]
    assert np.array_equal(np.asarray(color_jitter(img, 1.0, 1.0, 1.0, hue)), np.asarray(TF.adjust_hue(img, hue)))


@pytest.mark.parametrize("name", ["smooth-224", "noise"])
def test_random_jitters_equal_torchvision_color_jitter(name):
    # torchvision's own ColorJitter (the reference's transform) with torch's RNG seeded: the factors and
    # order it draws (ColorJitter.get_params, same seed) fed to ours give the same pixels.
    img = IMAGES[name]
    jitter = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    for seed in range(12):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = np.asarray(jitter(img))
            torch.manual_seed(seed)
            order, b, c, s, h = transforms.ColorJitter.get_params(
                jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue
            )
        got = jitter_pixels(np.asarray(img), b, c, s, h, order.tolist())
        assert np.array_equal(got, expected), seed


def test_jitter_clips_after_every_step():
    # Brightness 1.4 then contrast 0.6 on a bright colourful image: each step rounds and clips, so the
    # order matters and a single clip at the end would differ.
    img = _smooth(48, 48, 7)
    first = np.asarray(TF.adjust_contrast(TF.adjust_brightness(img, 1.4), 0.6))
    second = np.asarray(TF.adjust_brightness(TF.adjust_contrast(img, 0.6), 1.4))
    assert not np.array_equal(first, second)
    assert np.array_equal(np.asarray(color_jitter(img, 1.4, 0.6, 1.0, 0.0, (0, 1, 2, 3))), first)
    assert np.array_equal(np.asarray(color_jitter(img, 1.4, 0.6, 1.0, 0.0, (1, 0, 2, 3))), second)


def test_inputs_are_untouched_and_outputs_new():
    pixels = np.asarray(IMAGES["noise"]).copy()
    before = pixels.copy()
    out = jitter_pixels(pixels, 1.0, 1.0, 1.0, 0.0)
    assert np.array_equal(out, before) and out is not pixels
    out = jitter_pixels(pixels, 1.3, 0.7, 1.2, 0.05, (3, 1, 0, 2))
    assert np.array_equal(pixels, before) and out.dtype == np.uint8 and out.shape == pixels.shape


def test_bad_inputs():
    with pytest.raises(ValueError, match="permutation"):
        jitter_pixels(np.zeros((4, 4, 3), np.uint8), 1.0, 1.0, 1.0, 0.0, (0, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        jitter_pixels(np.zeros((4, 4, 3), np.float32), 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"\[-0.5, 0.5\]"):
        hue_shift(np.zeros((4, 3), np.uint8), 0.7)
    with pytest.raises(ValueError, match="mode 'L'"):
        color_jitter(Image.new("L", (4, 4)), 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(TypeError, match="PIL image"):
        color_jitter(np.zeros((4, 4, 3), np.uint8), 1.0, 1.0, 1.0, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("hue", [-0.1, 0.07])
def test_hue_equals_pil_for_every_colour(hue):
    # All 2**24 RGB colours through PIL's HSV round trip (torchvision's adjust_hue) and through the tables.
    codes = np.arange(2**24, dtype=np.uint32)
    rgb = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=-1).astype(np.uint8)
    rgb = rgb.reshape(4096, 4096, 3)
    assert np.array_equal(hue_shift(rgb, hue), np.asarray(TF.adjust_hue(Image.fromarray(rgb), hue)))
