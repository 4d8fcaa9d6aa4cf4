"""The image formats ``raml serve`` reads from clients and sends to them.

- :data:`QUERY_FORMATS`: the PIL formats a query upload may be in. Only these decoders are tried
  (``Image.open(..., formats=QUERY_FORMATS)``): PIL's other readers can decode before the header checks of
  :mod:`raml.deploy.service.decode` see a size (ICO and ICNS decode their embedded PNG, whatever size their
  directory declares, and BLP its JPEG; a 657 KB ICO cost the service 0.34 GB and a 2.4 s stall of the event loop),
  or hand the bytes to another program (EPS runs Ghostscript where it is installed).
- :func:`image_media_type`: the media type of a database image, from its first bytes. ``GET /image/{id}`` sends a
  file only when it starts like one of these formats, with that type and ``X-Content-Type-Options: nosniff``: an
  index whose path list names another file (``/etc/passwd``, an HTML page that a browser would run as the service's
  own origin) gets 404 instead of its bytes.
"""

from __future__ import annotations

__all__ = ["QUERY_FORMATS", "QUERY_FORMAT_NAMES", "SNIFF_BYTES", "image_media_type"]

#: PIL format names tried on a query upload, most common first
QUERY_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

#: the same, as a client reads them in an error message
QUERY_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"

#: bytes read from the start of a file to tell its type
SNIFF_BYTES = 18

#: the sizes of a BMP's info header (its bytes 14-17): "BM" alone would also start a text file
_BMP_INFO_SIZES = frozenset((12, 16, 40, 52, 56, 64, 108, 124))

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def image_media_type(head: bytes) -> str | None:
    """The media type of a file that starts with ``head`` (its first :data:`SNIFF_BYTES` bytes, or all of a shorter
    file): ``image/jpeg``, ``image/png``, ``image/webp``, ``image/gif``, ``image/bmp`` or ``image/tiff``; None
    for anything else."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if len(head) >= 18 and head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_INFO_SIZES:
        return "image/bmp"
    for signature, media_type in _SIGNATURES:
        if head.startswith(signature):
            return media_type
    return None
