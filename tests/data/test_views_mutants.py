"""Tests written for the survivors of mutation testing of raml.data.views (scripts/mutate.py views).

Each test asserts behaviour against a plain computation written here, so that a one-line change of the module
(a mutant) that keeps the shapes but changes a number fails it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from raml.data import views
from raml.data.views import ViewParams, color_twist_matrix


def test_mean_rgb_is_the_plain_mean_of_the_pixels() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    got = views._mean_rgb(Image.fromarray(pixels))
    assert np.allclose(got, pixels.reshape(-1, 3).astype(np.float64).mean(0), rtol=0, atol=1e-12)


def test_hue_rotation_by_a_third_of_a_turn_permutes_red_green_blue() -> None:
    """A rotation by 120 degrees about the grey axis maps red to green and green to blue (HSV's direction)."""
    third = views._hue_rotation(1.0 / 3.0)
    assert np.allclose(third @ [255.0, 0.0, 0.0], [0.0, 255.0, 0.0], atol=1e-9)
    assert np.allclose(third @ [0.0, 255.0, 0.0], [0.0, 0.0, 255.0], atol=1e-9)
    assert np.allclose(views._hue_rotation(0.0), np.eye(3), atol=1e-12)
    grey = np.array([80.0, 80.0, 80.0])
    assert np.allclose(views._hue_rotation(0.07) @ grey, grey, atol=1e-9)


def test_crop_box_is_left_upper_right_lower() -> None:
    view = ViewParams(top=3, left=5, height=7, width=11, flip=False)
    assert view.box == (5, 3, 16, 10)


def test_twist_of_brightness_then_contrast_against_a_plain_pixel_computation() -> None:
    """Brightness first (x -> b x), then contrast against the mean grey of the brightened image."""
    view = ViewParams(top=0, left=0, height=1, width=1, flip=False, brightness=1.2, contrast=0.7, order=(0, 1, 2, 3))
    mean = [100.0, 50.0, 20.0]
    x = np.array([30.0, 60.0, 90.0])
    brightened = 1.2 * x
    grey = 0.299 * 1.2 * mean[0] + 0.587 * 1.2 * mean[1] + 0.114 * 1.2 * mean[2]
    expected = 0.7 * brightened + 0.3 * grey
    twist = color_twist_matrix(view, mean)
    assert np.allclose(twist[:, :3] @ x + twist[:, 3], expected, atol=1e-9)
