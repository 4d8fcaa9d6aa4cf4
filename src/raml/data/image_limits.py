"""Size limits of an image, checked from its header before its pixels are decoded or resized.

Contract: :func:`resized_size` ``(width, height, S)`` -> ``(w', h')``, the size the evaluation transform
(:class:`raml.data.images.EvalTransform`) resizes an image of that size to before its centre crop: the shorter
side becomes :func:`~raml.data.images.eval_resize_size` ``(S)`` = ``S + S/7``, each side rounded with the same
function as :func:`~raml.data.images.resize_shorter` (imported from there, not copied). :func:`check_resized_size`
raises :class:`ImageTooLargeError` when that resized image has more than ``max_pixels`` pixels (the evaluation
transform calls it before resizing); :func:`check_image_size` also refuses an image over ``max_pixels`` itself
(the service's ``--max-pixels``).

:func:`check_size_within_limit` refuses the size ``S`` itself when even a square image would be resized to more than
``max_pixels`` pixels (every image would be refused; :func:`largest_image_size` is the largest ``S`` the limit
allows), so that a too large ``--image-size`` is reported as such, up front, rather than blamed on each image.

Why the resized size: a ``--max-pixels`` bound on width x height alone lets a tiny file of extreme aspect ratio
through (a 370-byte 100000x1 PNG has 100,000 pixels, but scaling its short side to 37 px at S = 32 asks for a
3,657,143 x 37 image, 135 M pixels; a 1,000,000 x 1 PNG at S = 224 would ask for ~260 GB).
"""

from __future__ import annotations

import math

from raml.data import images
from raml.data.images import ImageLoadError, eval_resize_size

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageSizeTooLargeError",
    "ImageTooLargeError",
    "check_image_size",
    "check_resized_size",
    "check_size_within_limit",
    "largest_image_size",
    "resized_size",
]

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest image, and largest resized image, in pixels (width x height) accepted by default (120 MB as RGB)."""


class ImageTooLargeError(ImageLoadError):
    """An image, or the image the evaluation transform would resize it to, is over the pixel limit."""


class ImageSizeTooLargeError(ValueError):
    """The image size itself is over the pixel limit: even a square image would be resized to too many pixels."""


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The size the evaluation transform at ``size`` resizes a ``width x height`` image to (before cropping).

    Args:
        width: Image width in pixels (positive).
        height: Image height in pixels (positive).
        size: The transform's output side ``S``.

    Returns:
        ``(w', h')``: the shorter side scaled to ``S + S/7``, each side rounded as ``resize_shorter`` does.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"An image needs a positive width and height, got {width}x{height}.")
    scale = eval_resize_size(size) / min(width, height)
    # the rounding helper of raml.data.images (the one resize_shorter uses), looked up at call time
    rounding = images._round_half_even
    return max(1, rounding(width * scale)), max(1, rounding(height * scale))


def _square_side(size: int) -> int:
    """The side a square image is resized to at ``size``: the fewest pixels any image is resized to."""
    return resized_size(1, 1, size)[0]


def _ratio(value: float) -> str:
    """An aspect ratio for a message: ``1.012``, ``29,560``."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"


def largest_image_size(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The largest evaluation size ``S`` at which a square image is resized to at most ``max_pixels`` pixels (0 if
    none is): above it, every image is over the limit."""
    # the resized side, about 8S/7, grows with S; S = isqrt(max_pixels) + 1 is already over the limit
    low, high = 0, math.isqrt(max(0, max_pixels)) + 1
    while low < high:  # the largest S in [low, high) within the limit; S = 0 (none) always is
        middle = (low + high + 1) // 2
        if _square_side(middle) ** 2 <= max_pixels:
            low = middle
        else:
            high = middle - 1
    return low


def check_size_within_limit(size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse an evaluation size at which even a square image is resized to more than ``max_pixels`` pixels.

    Args:
        size: The evaluation transform's ``S`` (the largest one a run uses).
        max_pixels: Largest accepted resized ``w' x h'``.

    Raises:
        ImageSizeTooLargeError: Naming ``--image-size`` and the largest size the limit allows.
    """
    side = _square_side(size)
    if side * side > max_pixels:
        raise ImageSizeTooLargeError(
            f"Image size {size} is too large: the evaluation transform scales an image's shorter side to S + S/7 = "
            f"{eval_resize_size(size):.6g} pixels, so even a square image becomes {side}x{side} = {side * side} "
            f"pixels, over the limit of {max_pixels} pixels, and every image would be refused; use --image-size "
            f"{largest_image_size(max_pixels)} or less (likewise --teacher-image-size), the largest size the limit "
            "allows."
        )


def check_resized_size(
    width: int, height: int, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "The image"
) -> None:
    """Refuse an image that the evaluation transform at ``size`` would resize to more than ``max_pixels`` pixels.

    Args:
        width: Width from the image's header.
        height: Height from the image's header.
        size: The evaluation transform's ``S``.
        max_pixels: Largest accepted resized ``w' x h'``.
        what: How the message names the image (e.g. its path).

    Raises:
        ImageTooLargeError: Naming both sizes and the limit.
    """
    new_width, new_height = resized_size(width, height, size)
    if new_width * new_height <= max_pixels:
        return
    side = _square_side(size)
    if side * side > max_pixels:  # the size is the cause, not the image
        cause = (
            f"image size {size} is too large for any image (even a square one becomes {side}x{side} pixels); use "
            f"an image size of at most {largest_image_size(max_pixels)}, the largest the limit allows."
        )
    else:
        shorter = eval_resize_size(size)
        # the longer side may be at most max_pixels // side pixels (rounded from ratio * shorter)
        allowed = (max_pixels // side + 0.5) / shorter
        cause = (
            f"its aspect ratio {_ratio(max(width, height) / min(width, height))}:1 is over the roughly "
            f"{_ratio(allowed)}:1 "
            f"that image size {size} allows; crop it closer to a square (or use a smaller image size)."
        )
    raise ImageTooLargeError(
        f"{what} is {width}x{height} pixels: at image size {size} its shorter side is scaled to "
        f"{eval_resize_size(size):.6g}, which makes it {new_width}x{new_height} = {new_width * new_height} "
        f"pixels, over the limit of {max_pixels} pixels: {cause}"
    )


def check_image_size(
    width: int, height: int, size: int | None, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "The image"
) -> None:
    """Refuse an image whose own pixels, or (with ``size``) whose resized pixels, exceed ``max_pixels``.

    Args:
        width: Width from the image's header.
        height: Height from the image's header.
        size: The evaluation transform's ``S`` (None: check the image's own size only).
        max_pixels: Largest accepted ``width x height``, before and after the resize.
        what: How the message names the image (e.g. its path).

    Raises:
        ImageTooLargeError: Naming the size and the limit.
    """
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels; "
            "use a smaller image."
        )
    if size is not None:
        check_resized_size(width, height, size, max_pixels, what)
