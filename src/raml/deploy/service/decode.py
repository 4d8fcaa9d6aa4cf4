"""Query images from untrusted bytes: size limits before decoding, then a fully loaded RGB ``PIL.Image``.

Contract: ``decode_query_image(data, max_pixels)`` -> ``RGB`` image (:func:`raml.data.images.to_rgb` rules), or
:class:`QueryImageError` carrying the HTTP status a client should get:

- 415: the bytes are not an image PIL can identify;
- 413: the header announces more than ``max_pixels`` pixels, or a size that the evaluation transform at the
  query size would resize to more than ``max_pixels`` pixels (an extreme aspect ratio such as 100000x1); both
  are checked before any pixel is decoded (:mod:`raml.data.image_limits`), so a decompression bomb costs
  nothing; or PIL's own bomb guard fires;
- 400: an empty body, or an image that fails while decoding (truncated or corrupt).

The byte limit of the request body itself is the caller's (it must stop reading early; see
:func:`raml.deploy.service.app.read_limited_body`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from PIL import Image, UnidentifiedImageError

from raml.data.image_limits import ImageTooLargeError, check_image_size
from raml.data.images import to_rgb
from raml.deploy.service.admission import ServiceBusyError

__all__ = ["DEFAULT_INLINE_DECODE_PIXELS", "QueryImageError", "decode_query_image", "header_pixels"]

#: ``raml serve`` decodes an image of at most this many pixels (from its header) on the event loop, not in a worker
#: thread (:func:`raml.deploy.service.app.create_app`): up to 128 x 128, decoding and the query transform took
#: 0.5 ms of CPU on the project's 2-core machine (256 x 256: 1.6 ms, 512 x 512: 5.4 ms), about what the hop to a
#: thread costs once the loop is busy; larger images would stall every other request on the loop for longer
DEFAULT_INLINE_DECODE_PIXELS = 128 * 128


class QueryImageError(ValueError):
    """A query the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def header_pixels(data: bytes) -> int | None:
    """Width x height announced by the image header of ``data`` (no pixel is decoded), or None where PIL cannot
    identify it (:func:`decode_query_image` then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 - any failure is reported by decode_query_image
        return None
    return width * height


def decode_query_image(
    data: bytes,
    max_pixels: int,
    size: int | None = None,
    admit: Callable[[int], AbstractContextManager[Any]] | None = None,
    finish: Callable[[Image.Image], Any] | None = None,
) -> Any:
    """Decode ``data`` into an RGB image of at most ``max_pixels`` pixels, before and after the query resize.

    Args:
        data: The uploaded file's bytes.
        max_pixels: Largest accepted width x height, and largest image the evaluation transform at ``size`` may
            resize it to (an extreme aspect ratio is refused before any pixel is decoded).
        size: The query size ``S`` the image will be transformed at (None: no check of the resized size).
        admit: Called with the image's pixel count (from its header, after the size checks); the context it
            returns is held while the image is decoded and ``finish`` runs (the service's decode budget, which
            raises :class:`~raml.deploy.service.admission.ServiceBusyError` when the image does not fit).
        finish: Applied to the RGB image inside ``admit``'s context (e.g. the query transform); its result is
            returned.

    Returns:
        The image in mode ``RGB``, independent of ``data`` (or ``finish``'s result).

    Raises:
        QueryImageError: With status 400, 413 or 415 (see the module docstring).
        ServiceBusyError: From ``admit``.
    """
    if not data:
        raise QueryImageError(400, "The request holds no image: send the image file as the body or as field 'image'.")
    try:
        # Image.open reads the header only (PIL itself refuses images over twice its global pixel limit there).
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            check_image_size(width, height, size, max_pixels, what="The image")
            with admit(width * height) if admit is not None else contextlib.nullcontext():
                img.load()
                rgb = to_rgb(img)
                img.close()  # the decoded source is no longer needed while ``finish`` runs
                return finish(rgb) if finish is not None else rgb
    except (QueryImageError, ServiceBusyError):
        raise
    except ImageTooLargeError as refused:
        raise QueryImageError(413, f"{refused} (this service's --max-pixels)") from None
    except UnidentifiedImageError as error:
        raise QueryImageError(
            415, "The upload is not an image this service can read (JPEG, PNG, WebP, GIF, BMP, TIFF ...)."
        ) from error
    except Image.DecompressionBombError as error:
        raise QueryImageError(413, f"The image is too large to decode safely ({error}); send a smaller one.") from error
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... on truncated or corrupt data
        raise QueryImageError(
            400, f"The image could not be decoded ({type(error).__name__}: {error}); it is truncated or corrupt."
        ) from error
