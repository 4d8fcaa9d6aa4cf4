"""Query images from untrusted bytes: size limits before decoding, then a fully loaded RGB ``PIL.Image``.

Contract: ``decode_query_image(data, max_pixels)`` (``open_query_image`` reading the header, then
``decode_opened_image``) -> ``RGB`` image (:func:`raml.data.images.to_rgb` rules), or
:class:`QueryImageError` carrying the HTTP status a client should get:

- 415: the bytes are not an image in one of :data:`~raml.deploy.service.image_types.QUERY_FORMATS` (PIL's other
  readers are never tried: some decode before a size can be checked, see :mod:`raml.deploy.service.image_types`);
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
from raml.deploy.service.image_types import QUERY_FORMAT_NAMES, QUERY_FORMATS

__all__ = [
    "DEFAULT_INLINE_DECODE_PIXELS",
    "QueryImageError",
    "decode_opened_image",
    "decode_query_image",
    "open_query_image",
]

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


def open_query_image(data: bytes) -> Image.Image:
    """Identify ``data`` and read its header, no pixel decoded: the image to hand to :func:`decode_opened_image`
    (its ``size`` is the announced width x height; ``raml serve`` reads it on the event loop to choose where to
    decode). PIL itself refuses a header over twice its global pixel limit here.

    Raises:
        QueryImageError: 400 (no bytes; a header that fails), 413 (PIL's bomb guard), 415 (not an image).
    """
    if not data:
        raise QueryImageError(400, "The request holds no image: send the image file as the body or as field 'image'.")
    try:
        return Image.open(io.BytesIO(data), formats=QUERY_FORMATS)
    except Exception as error:  # noqa: BLE001 - mapped to the status a client should get
        raise _refusal(error) from error


def decode_opened_image(
    img: Image.Image,
    max_pixels: int,
    size: int | None = None,
    admit: Callable[[int], AbstractContextManager[Any]] | None = None,
    finish: Callable[[Image.Image], Any] | None = None,
) -> Any:
    """Decode an image from :func:`open_query_image` into RGB within ``max_pixels``, before and after the query
    resize, and apply ``finish``; ``img`` is closed whatever happens. The arguments are those of
    :func:`decode_query_image`."""
    try:
        with img:
            width, height = img.size
            check_image_size(width, height, size, max_pixels, what="The image")
            with admit(width * height) if admit is not None else contextlib.nullcontext():
                img.load()
                rgb = to_rgb(img)
                img.close()  # the decoded source is no longer needed while ``finish`` runs
                return finish(rgb) if finish is not None else rgb
    except (QueryImageError, ServiceBusyError):
        raise
    except Exception as error:  # noqa: BLE001 - mapped to the status a client should get
        raise _refusal(error) from error


def _refusal(error: Exception) -> QueryImageError:
    """The :class:`QueryImageError` for an exception raised while identifying or decoding an upload."""
    if isinstance(error, ImageTooLargeError):
        return QueryImageError(413, f"{error} (this service's --max-pixels)")
    if isinstance(error, UnidentifiedImageError):
        return QueryImageError(415, f"The upload is not an image this service reads: send a {QUERY_FORMAT_NAMES} file.")
    if isinstance(error, Image.DecompressionBombError):
        return QueryImageError(413, f"The image is too large to decode safely ({error}); send a smaller one.")
    # PIL raises OSError, SyntaxError, ValueError ... on truncated or corrupt data
    return QueryImageError(
        400, f"The image could not be decoded ({type(error).__name__}: {error}); it is truncated or corrupt."
    )


def decode_query_image(
    data: bytes,
    max_pixels: int,
    size: int | None = None,
    admit: Callable[[int], AbstractContextManager[Any]] | None = None,
    finish: Callable[[Image.Image], Any] | None = None,
) -> Any:
    """Decode ``data`` into an RGB image of at most ``max_pixels`` pixels, before and after the query resize:
    :func:`open_query_image`, then :func:`decode_opened_image`.

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
    return decode_opened_image(open_query_image(data), max_pixels, size, admit, finish)
