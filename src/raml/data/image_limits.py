"""Size limits of an image, checked from its header before its pixels are decoded or resized.

Contract: :func:`resized_size` ``(width, height, S)`` -> ``(w', h')``, the size the evaluation transform
(:class:`raml.data.images.EvalTransform`) resizes an image of that size to before its centre crop: the shorter
side becomes :func:`~raml.data.images.eval_resize_size` ``(S)`` = ``S + S/7``, each side rounded with the same
function as :func:`~raml.data.images.resize_shorter` (imported from there, not copied). :func:`check_resized_size`
raises :class:`ImageTooLargeError` when that resized image has more than ``max_pixels`` pixels (the evaluation
transform calls it before resizing); :func:`check_image_size` also refuses an image over ``max_pixels`` itself
(the service's ``--max-pixels``).

Why the resized size: a ``--max-pixels`` bound on width x height alone lets a tiny file of extreme aspect ratio
through (a 370-byte 100000x1 PNG has 100,000 pixels, but scaling its short side to 37 px at S = 32 asks for a
3,657,143 x 37 image, 135 M pixels; a 1,000,000 x 1 PNG at S = 224 would ask for ~260 GB).
"""

from __future__ import annotations

from raml.data import images
from raml.data.images import ImageLoadError, eval_resize_size

__all__ = ["DEFAULT_MAX_PIXELS", "ImageTooLargeError", "check_image_size", "check_resized_size", "resized_size"]

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest image, and largest resized image, in pixels (width x height) accepted by default (120 MB as RGB)."""


class ImageTooLargeError(ImageLoadError):
    """An image, or the image the evaluation transform would resize it to, is over the pixel limit."""


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
    if new_width * new_height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} pixels: at image size {size} its shorter side is scaled to "
            f"{eval_resize_size(size):.6g}, which makes it {new_width}x{new_height} = {new_width * new_height} "
            f"pixels, over the limit of {max_pixels} pixels (an extreme aspect ratio); crop it to a usual shape."
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
