"""The compiled jitter and mix kernels give exactly the pixels of the numpy reference implementations.

The independent references: :func:`raml.data.color_jitter.jitter_pixels` / ``hue_shift`` (numpy, themselves
tested against torchvision's PIL ops in tests/data/test_color_jitter.py), a mirrored copy written with numpy
slicing, and ``torch.lerp`` on float32 copies.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from raml.data.color_jitter import hue_shift, jitter_pixels
from raml.data.jitter_kernel import jitter_into, warm_up
from raml.data.mix_kernel import lerp_uint8_into


def _smooth(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(1, height // 9), max(1, width // 9), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def _special_colours() -> np.ndarray:
    """Greys, black, white, saturated primaries/secondaries, ties between the largest channels, and the
    colours around red where a hue shift wraps past 0 / 255."""
    levels = [0, 1, 2, 17, 40, 127, 128, 200, 254, 255]
    colours = [(a, b, c) for a in levels for b in levels for c in levels]
    colours += [(255, 0, k) for k in range(0, 256, 5)] + [(255, k, 0) for k in range(0, 256, 5)]
    return np.array(colours, dtype=np.uint8).reshape(23, 48, 3)  # 1000 + 2 * 52 colours


def _reference(pixels, factors, order, flip):
    return jitter_pixels(pixels[:, ::-1] if flip else pixels, *factors, order)


_ORDERS = list(itertools.permutations(range(4)))


def test_random_draws_orders_and_shapes_equal_the_numpy_reference():
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 7), (5, 1), (3, 4), (17, 23), (48, 64), (64, 48), (224, 224)]
    for trial in range(120):
        height, width = shapes[trial % len(shapes)]
        kind = trial % 3
        if kind == 0:
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # noise: every colour region
        elif kind == 1:
            pixels = _smooth(width, height, trial)
        else:
            pixels = np.ascontiguousarray(np.resize(_special_colours(), (height, width, 3)))
        factors = [*rng.uniform(0.6, 1.4, 3), rng.uniform(-0.1, 0.1)]
        # a factor of exactly 1 / hue of 0 skips the step, as ColorJitter; sometimes also the extremes
        for k in np.flatnonzero(rng.random(4) < 0.2):
            extremes = [0.0, -0.5, 0.5] if k == 3 else [1.0, 0.0, 2.0, 0.5]
            factors[k] = float(rng.choice(extremes))
        order = _ORDERS[trial % 24]
        flip = bool(trial % 2)
        got = jitter_into(pixels, *factors, order, flip=flip)
        assert np.array_equal(got, _reference(pixels, factors, order, flip)), (trial, factors, order, flip)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (1, 1023), (1, 1025), (41, 50), (3, 700)])
def test_chunk_boundaries_in_place_steps_and_flips(height, width):
    # The steps run over chunks of 1024 pixels, the later ones in place through a copy of each chunk, and a
    # flipped view mirrors first: pixel counts at, below and across chunk ends, every order, both flips.
    rng = np.random.default_rng(height * 10_000 + width)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for k, order in enumerate(_ORDERS):
        factors = (*rng.uniform(0.6, 1.4, 3), float(rng.uniform(-0.1, 0.1)))
        flip = k % 2 == 1
        expected = _reference(pixels, factors, order, flip)
        np.testing.assert_array_equal(jitter_into(pixels, *factors, order, flip=flip), expected, err_msg=str(order))


@pytest.mark.parametrize("order", _ORDERS)
def test_every_order_on_edge_colours(order):
    # Every permutation (contrast first, last, between; brightness right after contrast: composed tables).
    pixels = _special_colours()
    for factors in ([1.4, 0.6, 1.4, 0.1], [0.6, 1.4, 0.6, -0.1], [1.3, 0.7, 0.0, 0.5], [0.0, 0.0, 1.2, -0.5]):
        for flip in (False, True):
            got = jitter_into(pixels, *factors, order, flip=flip)
            assert np.array_equal(got, _reference(pixels, factors, order, flip)), (factors, flip)


@pytest.mark.parametrize("factor", [0.0, 0.6, 0.75, 1.0000001, 1.4, 3.0])
@pytest.mark.parametrize("step", [0, 1, 2])
def test_single_steps_including_factor_zero(step, factor):
    pixels = np.concatenate([_special_colours(), _smooth(48, 23, 3)])
    factors = [1.0, 1.0, 1.0, 0.0]
    factors[step] = factor
    assert np.array_equal(jitter_into(pixels, *factors), jitter_pixels(pixels, *factors))


def _hue_cases(hue: float, step: int) -> None:
    # RGB colours (every step-th code of 2**24): the compiled hue against the numpy tables (which equal PIL's
    # HSV round trip on every colour, test_color_jitter.py).
    codes = np.arange(0, 2**24, step, dtype=np.uint32)
    rgb = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=-1).astype(np.uint8)
    rgb = rgb.reshape(1, -1, 3)
    assert np.array_equal(jitter_into(rgb, 1.0, 1.0, 1.0, hue), hue_shift(rgb, hue))


@pytest.mark.parametrize("hue", [-0.5, -0.0031, 0.1])
def test_hue_on_a_seventh_of_all_colours_equals_the_tables(hue):
    _hue_cases(hue, 7)


@pytest.mark.slow
@pytest.mark.parametrize("hue", [-0.5, -0.1, -0.0031, 0.0021, 0.07, 0.1, 0.5])
def test_hue_on_every_colour_equals_the_tables(hue):
    _hue_cases(hue, 1)


def test_output_array_layouts_and_inputs():
    pixels = _smooth(40, 30, 5)
    frozen = pixels.copy()
    frozen.flags.writeable = False  # np.asarray(PIL image) is read-only
    strided = np.ascontiguousarray(np.concatenate([pixels, pixels], axis=1))[:, ::2]  # not contiguous
    expected = jitter_pixels(pixels, 1.2, 0.8, 1.1, 0.03, (3, 2, 1, 0))
    for src in (pixels, frozen):
        assert np.array_equal(jitter_into(src, 1.2, 0.8, 1.1, 0.03, (3, 2, 1, 0)), expected)
    assert np.array_equal(
        jitter_into(strided, 1.2, 0.8, 1.1, 0.03, (3, 2, 1, 0)),
        jitter_pixels(np.ascontiguousarray(strided), 1.2, 0.8, 1.1, 0.03, (3, 2, 1, 0)),
    )
    batch = np.zeros((3, 30, 40, 3), dtype=np.uint8)
    returned = jitter_into(pixels, 1.2, 0.8, 1.1, 0.03, (3, 2, 1, 0), out=batch[1])
    assert returned is batch[1] or np.shares_memory(returned, batch)
    assert np.array_equal(batch[1], expected) and not batch[0].any() and not batch[2].any()
    assert np.array_equal(pixels, frozen)  # the input is not modified
    # no step drawn: the (flipped) copy
    assert np.array_equal(jitter_into(pixels, 1.0, 1.0, 1.0, 0.0, flip=True), pixels[:, ::-1])
    assert jitter_into(np.zeros((0, 4, 3), np.uint8), 1.2, 0.8, 1.1, 0.03).shape == (0, 4, 3)


def test_bad_arguments():
    pixels = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="permutation"):
        jitter_into(pixels, 1.0, 1.0, 1.0, 0.0, (0, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        jitter_into(pixels.astype(np.float32), 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"\[-0.5, 0.5\]"):
        jitter_into(pixels, 1.0, 1.0, 1.0, 0.7)
    with pytest.raises(ValueError, match="C-contiguous"):
        jitter_into(pixels, 1.1, 1.0, 1.0, 0.0, out=np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        jitter_into(pixels, 1.1, 1.0, 1.0, 0.0, out=np.zeros((4, 8, 3), np.uint8)[:, ::2])
    with pytest.raises(ValueError, match="overlap"):
        jitter_into(pixels, 1.1, 1.0, 1.0, 0.0, out=pixels)


def test_warm_up_runs():
    warm_up()


def test_writable_and_read_only_sources_share_one_compiled_variant():
    """numba compiles a kernel per argument type, and a read-only array is a type of its own: every source reaches
    the kernels read-only (a view; the caller's array keeps its flag), so a fresh install compiles once."""
    from raml.data import jitter_kernel

    pixels = _smooth(12, 10, 2).copy()  # writable (np.asarray of a PIL image is read-only)
    frozen = pixels.copy()
    frozen.flags.writeable = False
    for src in (pixels, frozen):
        for flip in (False, True):
            jitter_into(src, 1.1, 0.9, 1.2, 0.02, (1, 0, 2, 3), flip=flip)
    assert pixels.flags.writeable and not frozen.flags.writeable
    steps = jitter_kernel._jitter_steps.signatures
    assert len(steps) == 1 and steps[0][0].mutable is False, steps  # the entry kernel (it holds the others)


@pytest.mark.parametrize("weight", [0.0, 1e-7, 0.2, 0.4999, 0.5, 0.73, 1.0 - 1e-7, 1.0])
def test_lerp_uint8_equals_torch_lerp(weight):
    rng = np.random.default_rng(1)
    start = rng.integers(0, 256, (2, 33, 17, 3), dtype=np.uint8)
    end = rng.integers(0, 256, (2, 33, 17, 3), dtype=np.uint8)
    start[0, 0, 0], end[0, 0, 0] = 0, 255
    out = np.full(start.shape, np.nan, dtype=np.float32)
    lerp_uint8_into(start, end, weight, out)
    # torch.lerp's formula, each step rounded to float32 (torch's vectorised CPU kernel fuses a multiply-add,
    # so it may differ from this in the last bit: compared with a tolerance)
    a, b, w = start.astype(np.float32), end.astype(np.float32), np.float32(weight)
    expected = a + w * (b - a) if weight < 0.5 else b - (b - a) * (np.float32(1) - w)
    assert np.array_equal(out, expected)
    torch_lerp = torch.lerp(torch.from_numpy(start).float(), torch.from_numpy(end).float(), weight).numpy()
    assert np.abs(out - torch_lerp).max() <= 3e-5
    if weight in (0.0, 1.0):
        assert np.array_equal(out, (end if weight else start).astype(np.float32))


def test_lerp_uint8_rejects_other_layouts():
    a = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        lerp_uint8_into(a, a, 0.5, np.zeros((4, 4, 3), np.float64))
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        lerp_uint8_into(a, np.zeros((4, 8, 3), np.uint8)[:, ::2], 0.5, np.zeros((4, 4, 3), np.float32))


def _hsv_round_trip_halves(step: int) -> None:
    # The hue kernel computes PIL's two conversions (no tables); each half against the numpy tables (which equal
    # PIL's arithmetic, test_color_jitter.py): RGB -> (H, S, V) on every step-th of the 2**24 colours, and
    # (H, S, V) -> RGB on every step-th of the 2**24 triples. A shift only moves H (modulo 256) between them, so
    # with step 1 this covers every colour at every one of the 256 shifts.
    from raml.data.color_jitter import _hsv_tables
    from raml.data.jitter_kernel import _hsv_chunk, _rgb_chunk

    hue_cr, sat, weights = _hsv_tables()
    codes = np.arange(0, 2**24, step, dtype=np.uint32)
    a, b, c = (
        ((codes >> 16) & 255).astype(np.int32),
        ((codes >> 8) & 255).astype(np.int32),
        (codes & 255).astype(np.int32),
    )
    h_cr = hue_cr[(a - b + 255) * 511 + (b - c + 255)].astype(np.int32)
    top = np.maximum(np.maximum(a, b), c)
    hue, saturation, value = (np.empty(codes.size, dtype=np.int32) for _ in range(3))
    _hsv_chunk(np.stack([a, b, c], axis=-1).astype(np.uint8).reshape(-1), hue, saturation, value)
    assert np.array_equal(hue, h_cr & 255)
    assert np.array_equal(saturation, sat.reshape(-1)[(h_cr & 0xFF00) | top])
    assert np.array_equal(value, top)
    # (H, S, V) = (a, b, c): round(V * w) with the tables' float32 weights
    key = (a << 8) | b
    expected = np.stack([(w[key] * c.astype(np.float32) + np.float32(0.5)).astype(np.int32) for w in weights], -1)
    out = np.empty(3 * codes.size, dtype=np.uint8)
    _rgb_chunk(a, b, c, 0, out)
    assert np.array_equal(out.reshape(-1, 3), expected.astype(np.uint8))


def test_hsv_conversions_on_a_seventh_of_all_colours_equal_the_tables():
    _hsv_round_trip_halves(7)


@pytest.mark.slow
def test_hsv_conversions_on_every_colour_and_shift_equal_the_tables():
    _hsv_round_trip_halves(1)
