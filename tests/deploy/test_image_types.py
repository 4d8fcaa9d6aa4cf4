"""The image formats ``raml serve`` reads and sends (:mod:`raml.deploy.service.image_types`): a query in any other
format is refused before a decoder runs (ICO / ICNS embed a PNG that PIL decodes at open, whatever size their
directory declares; EPS runs Ghostscript), and ``GET /image/{id}`` sends only files that start like an image."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from raml.deploy.service.decode import QueryImageError, decode_query_image
from raml.deploy.service.image_types import QUERY_FORMATS, SNIFF_BYTES, image_media_type

MAX_PIXELS = 1_000_000


def _saved(fmt: str, **options) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png(width: int, height: int) -> bytes:
    """An all-zero RGBA PNG of ``width`` x ``height``: a few kB on disk however large."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    rows = b"".join(packer.compress(b"\0" * (1 + 4 * width)) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _ico_declaring_16_px(png: bytes) -> bytes:
    """An ICO whose one directory entry says 16 x 16 and holds ``png`` (of any size)."""
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


SENT = ["JPEG", "PNG", "GIF", "BMP", "TIFF"] + (["WEBP"] if features.check("webp") else [])


@pytest.mark.parametrize("fmt", SENT)
def test_each_format_the_service_reads_is_sent_with_the_type_pil_names(fmt):
    Image.init()
    data = _saved(fmt)
    assert fmt in QUERY_FORMATS
    assert image_media_type(data[:SNIFF_BYTES]) == Image.MIME[fmt]
    assert decode_query_image(data, MAX_PIXELS).size == (11, 9)  # and a query in it is read


def test_a_big_endian_tiff_is_an_image_and_other_files_are_not():
    assert image_media_type(b"MM\x00*\x00\x00\x00\x08" + b"\0" * 10) == "image/tiff"
    others = [
        b"",
        b"root:x:0:0:root:/root:/bin/bash\n",
        b"<!doctype html><script>alert(1)</script>",
        b"BMW 320d, 2019, 48,000 km\n",  # "BM" and text: not a bitmap
        b"RIFF\x24\x00\x00\x00WAVEfmt ",
        b"%!PS-Adobe-3.0 EPSF-3.0\n",
        _saved("ICO", sizes=[(8, 8)]),
        b"\xff\xd8",  # a JPEG's first two bytes only
    ]
    for head in others:
        assert image_media_type(head[:SNIFF_BYTES]) is None, head[:20]


def test_an_ico_holding_a_large_png_is_refused_before_its_png_is_decoded():
    """The directory says 16 x 16; the PNG inside is 2000 x 2000 (4 M pixels, over the 1 M limit). PIL's ICO reader
    decodes that PNG when the file is opened, before any size check: the service refuses the format instead."""
    bomb = _ico_declaring_16_px(_png(2000, 2000))
    assert len(bomb) < 40_000
    with pytest.raises(QueryImageError) as refused:
        decode_query_image(bomb, MAX_PIXELS)
    assert refused.value.status == 415
    assert "JPEG, PNG, WebP, GIF, BMP or TIFF" in str(refused.value)


@pytest.mark.parametrize(
    "data",
    [
        _saved("ICO", sizes=[(8, 8)]),
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        b"icns\x00\x00\x00\x10ic07\x00\x00\x00\x08",
        _saved("PPM"),
    ],
    ids=["ico", "eps", "icns", "ppm"],
)
def test_a_query_in_a_format_the_service_does_not_read_gets_415(data):
    with pytest.raises(QueryImageError) as refused:
        decode_query_image(data, MAX_PIXELS)
    assert refused.value.status == 415
