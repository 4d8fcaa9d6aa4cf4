"""Image loading and the evaluation transform.

Contracts:

- :func:`load_image`: file -> fully loaded ``PIL.Image`` in mode ``RGB`` (8 bit per channel), or
  :class:`ImageLoadError` naming the file and the reason.
- :class:`EvalTransform`: RGB ``PIL.Image`` -> ``(3, S, S)`` float32 tensor: Lanczos resize of the shorter
  side to ``S + S/7`` (each side rounded half to even, Python's ``round``, as the reference's ``imrescale``),
  centre crop ``S x S``, scale to [0, 1], normalise with mean/std.

Mode conversion rules of :func:`to_rgb` (kept simple on purpose):

- ``RGB`` is kept; ``L``, ``1``, ``LA``, ``RGBA``, ``CMYK``, ``YCbCr`` ... go through ``convert("RGB")``,
  which drops alpha (the colour under a transparent pixel is kept, not composited on a background).
- ``P`` / ``PA`` (palette, with or without transparency) -> ``RGBA`` -> ``RGB`` (alpha dropped likewise).
- 16/32-bit integer modes (``I;16*``, ``I``) are read as 16-bit intensities: ``0..65535 -> 0..255``
  (``round(v * 255 / 65535)``, values outside clipped), then grey -> RGB.
- ``F`` (32-bit float) is read as intensities in [0, 1]: ``round(v * 255)`` clipped to ``0..255``.

EXIF orientation is not applied (the published models were evaluated on the raw pixel grid).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

_ALPHA_PALETTE_MODES = ("P", "PA")

SOURCE_PATH_INFO = "raml_source_path"
"""Key of ``Image.info`` under which :func:`load_image` records the file an image came from, so that an error of
:class:`EvalTransform` names the file (PIL writers ignore keys they do not know)."""


class ImageLoadError(RuntimeError):
    """An image file is missing, empty, truncated, not an image, or cannot be converted to RGB."""


_CHUNK_PIXELS = 1 << 18  # 16-bit and float conversions: pixels converted at a time, not the whole image


def _gray_by_bands(img: Image.Image, dtype: type, to_gray: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """``img`` -> ``L``, a band of rows (about :data:`_CHUNK_PIXELS` pixels) at a time: each band read as ``dtype``
    and mapped to 0..255 by ``to_gray`` (which may work in place), so no copy of the whole image is made."""
    width, height = img.size
    gray = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        gray[top:bottom] = to_gray(np.asarray(img.crop((0, top, width, bottom)), dtype=dtype))
    return Image.fromarray(gray)


def _sixteen_bit_band(values: np.ndarray) -> np.ndarray:
    """``round(v * 255 / 65535)`` in integers, in place (no float copy)."""
    np.clip(values, 0, 65535, out=values)
    values *= 2  # round(v / 257) = (2v + 257) // 514 (never a tie: 257 is odd)
    values += 257
    values //= 514
    return values


def _float_band(values: np.ndarray) -> np.ndarray:
    """``round(v * 255)`` (halves to even) clipped to ``0..255``, NaN as 0, in place."""
    np.nan_to_num(values, copy=False, nan=0.0)
    with np.errstate(over="ignore"):  # +-1.8e308 * 255 is +-inf, clipped like any large value
        values *= 255.0
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values


def _sixteen_bit_to_gray(img: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` -> ``L``: ``round(v * 255 / 65535)`` in integers, a band of rows at a time."""
    return _gray_by_bands(img, np.int64, _sixteen_bit_band)


def _float_to_gray(img: Image.Image) -> Image.Image:
    """``F`` -> ``L`` a band of rows at a time: a whole-image float64 copy (and its temporaries) took 36 bytes a
    pixel, 1.4 GB for a 252 kB TIFF of 40 M pixels, where the service's decode budget counts about 8."""
    return _gray_by_bands(img, np.float64, _float_band)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit ``RGB`` (see the module docstring for the rules).

    Args:
        img: A PIL image (its pixels are loaded if they are not yet).

    Returns:
        A new ``RGB`` image of the same size (a copy even when ``img`` is already RGB).
    """
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in _ALPHA_PALETTE_MODES:
        return img.convert("RGBA").convert("RGB")
    if mode == "I" or mode.startswith("I;16"):
        return _sixteen_bit_to_gray(img).convert("RGB")
    if mode == "F":
        return _float_to_gray(img).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file, load all its pixels, and convert it to ``RGB``.

    Args:
        path: The image file.

    Returns:
        The image in mode ``RGB``, independent of the file (the file is closed); ``info[SOURCE_PATH_INFO]`` holds
        ``str(path)``.

    Raises:
        ImageLoadError: The file is missing, empty, truncated, not an image, or its mode cannot be converted;
            the message names the file and the reason.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"Cannot load image {path}: the file does not exist.")
    if not path.is_file():
        raise ImageLoadError(f"Cannot load image {path}: it is not a regular file.")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"Cannot load image {path}: the file is empty (0 bytes); re-download or remove it.")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = to_rgb(img)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageLoadError(
            f"Cannot load image {path}: {type(exc).__name__}: {exc} "
            "(the file is truncated, corrupt or not an image; re-download or remove it)."
        ) from exc
    rgb.info[SOURCE_PATH_INFO] = str(path)
    return rgb


def _round_half_even(x: float) -> int:
    """Round to the nearest integer, halves to the even neighbour: Python's ``round``, which the reference's
    ``imrescale`` (``datahelpers.py``) applies to each scaled side (681 x 512 at 256: 340.5 -> 340)."""
    return round(float(x))


def eval_resize_size(size: int) -> float:
    """Target length of the shorter side before the centre crop: ``S + S/7`` (256 for 224, 512 for 448)."""
    _check_size(size)
    return size + size / 7


def resize_shorter(
    img: Image.Image, shorter: float, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    """Scale ``img`` so that its shorter side becomes ``shorter``, each side rounded to the nearest integer.

    The arithmetic is the reference's ``imrescale(img, shorter, side=min)``: ``ratio = shorter / min(w, h)``,
    then ``round(ratio * w)`` and ``round(ratio * h)`` with Python's ``round`` (halves to even, e.g. 340.5 ->
    340).

    Args:
        img: The image.
        shorter: Target length of the shorter side (may be fractional; the scale factor uses it unrounded).
        resample: PIL resampling filter (Lanczos by default, as the published models were evaluated with).

    Returns:
        The resized image (at least 1 pixel per side).
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"resize_shorter expects a PIL image, got {type(img).__name__}.")
    if not shorter > 0:
        raise ValueError(f"Target shorter side must be positive, got {shorter!r}.")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ValueError(f"Cannot resize an empty image of size {img.size}.")
    ratio = shorter / min(w, h)
    new_size = (max(1, _round_half_even(ratio * w)), max(1, _round_half_even(ratio * h)))
    return img.resize(new_size, resample=resample)


def centre_crop_box(image_size: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """PIL box ``(left, top, right, bottom)`` of the central ``size`` x ``size`` square of an image of
    ``image_size`` = ``(width, height)``, placed as torchvision's ``center_crop`` places it: the offsets are
    ``round((side - size) / 2)`` with Python's round (halves to even: 37 - 32 -> 2.5 -> 2).

    Raises:
        ValueError: If a side is shorter than ``size`` (the evaluation resize never makes one).
    """
    width, height = image_size
    if width < size or height < size:
        raise ValueError(f"Cannot crop {size} x {size} pixels from an image of {width} x {height}.")
    left, top = round((width - size) / 2.0), round((height - size) / 2.0)
    return left, top, left + size, top + size


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size <= 0:
        raise ValueError(f"Image size must be a positive integer number of pixels, got {size!r}.")


class EvalTransform:
    """RGB ``PIL.Image`` -> ``(3, S, S)`` float32: resize shorter side to ``S + S/7``, centre crop, normalise.

    Args:
        size: Output side ``S`` in pixels.
        mean: Per-channel mean (3 values, in [0, 1] units) subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation (3 positive values) divided by.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        _check_size(size)
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).flatten()
        std_t = torch.as_tensor(list(std), dtype=torch.float32).flatten()
        if mean_t.numel() != 3 or std_t.numel() != 3:
            raise ValueError(f"mean and std need 3 values each (R, G, B), got {list(mean)} and {list(std)}.")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std values must all be positive, got {list(std)}.")
        self.size = int(size)
        self.mean = tuple(float(x) for x in mean_t)
        self.std = tuple(float(x) for x in std_t)
        self._mean = mean_t.view(3, 1, 1).numpy()
        self._std = std_t.view(3, 1, 1).numpy()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Transform one image.

        Args:
            img: A PIL image in mode ``RGB`` (use :func:`load_image`).

        Returns:
            ``(3, size, size)`` float32 tensor.

        Raises:
            raml.data.image_limits.ImageTooLargeError: If the resized image would have more than
                ``raml.data.image_limits.DEFAULT_MAX_PIXELS`` pixels (an extreme aspect ratio); the message names
                the file when the image comes from :func:`load_image`.
        """
        if not isinstance(img, Image.Image):
            raise TypeError(f"EvalTransform expects a PIL image, got {type(img).__name__}; load it with load_image.")
        if img.mode != "RGB":
            raise ValueError(
                f"EvalTransform expects an RGB image, got mode {img.mode!r}; "
                "load it with raml.data.load_image (or call raml.data.images.to_rgb) first."
            )
        from raml.data.image_limits import check_resized_size  # imported here: image_limits imports this module

        source = img.info.get(SOURCE_PATH_INFO)
        what = f"Image {source}" if source is not None else "The image"
        check_resized_size(img.size[0], img.size[1], self.size, what=what)  # before the resize allocates it
        img = resize_shorter(img, eval_resize_size(self.size))
        img = img.crop(centre_crop_box(img.size, self.size))
        # to_tensor and normalise in numpy, in float32 as torchvision's to_tensor + normalise compute them (bit for
        # bit the same, tests/data/test_images.py): a few array operations instead of a dozen torch calls, which
        # cost more than the arithmetic on a query-sized image (raml serve runs this on its event loop)
        x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
        x /= np.float32(255.0)
        x -= self._mean
        x /= self._std
        return torch.from_numpy(x)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, resize_shorter={eval_resize_size(self.size):g}, "
            f"resample=LANCZOS, mean={self.mean}, std={self.std})"
        )
