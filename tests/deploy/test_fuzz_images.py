"""A bounded, seeded fuzz of the query image decoder (issue 18, item 8, images): mutated PNG, JPEG, GIF, WebP,
TIFF and BMP bytes through the service's decode + query transform.

Every input must end in one of the documented outcomes (:mod:`raml.deploy.service.decode`): an RGB image that
transforms to ``(3, S, S)``, or :class:`QueryImageError` with status 400, 413 or 415; never another exception.
The process's peak resident memory over the whole run stays bounded (``--max-pixels`` is 1 M pixels here).
``FUZZ_INPUTS`` inputs are tried (3000, or ``RAML_FUZZ_INPUTS``; a fixed seed: the same inputs on every run);
the figures in docs/deployment.md are from this test (``pytest -s`` prints them).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from raml.data.images import EvalTransform
from raml.deploy.service.decode import QueryImageError, decode_query_image

FUZZ_INPUTS = int(os.environ.get("RAML_FUZZ_INPUTS", "3000"))  # inputs tried per run (more: set the variable)
SEED = 18
S = 32
MAX_PIXELS = 1_000_000
MAX_SECONDS = 60.0 + FUZZ_INPUTS / 50  # a safety bound on the loop (3000 inputs: ~6 s on a loaded 2-core machine)
MB = 2**20


def _seeds() -> dict[str, bytes]:
    """One small image per format, with the modes that exercise the decoders' branches."""
    rng = np.random.default_rng(SEED)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 31, 3), dtype=np.uint8))
    out = {}
    for name, image, options in [
        ("PNG", rgb, {}),
        ("PNG", Image.fromarray(rng.integers(0, 65536, (17, 13), dtype=np.uint16)), {}),  # 16-bit grey
        ("JPEG", rgb, {"quality": 80}),
        ("JPEG", rgb.convert("L"), {"progressive": True}),
        ("GIF", rgb.convert("P"), {}),
        ("WEBP", rgb, {"quality": 70}),
        ("TIFF", rgb, {"compression": "tiff_deflate"}),
        ("TIFF", rgb.convert("CMYK"), {}),
        ("BMP", rgb, {}),
        ("BMP", rgb.convert("P"), {}),
    ]:
        if name == "WEBP" and not features.check("webp"):
            continue
        buffer = io.BytesIO()
        image.save(buffer, format=name, **options)
        out[f"{name}-{image.mode}-{len(out)}"] = buffer.getvalue()
    return out


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four random edits: flipped bits, random bytes, a cut, a duplicated or deleted span, big numbers."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(0, 6))
        at = int(rng.integers(0, max(1, len(buf))))
        if kind == 0 and buf:  # flip a bit
            buf[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1 and buf:  # overwrite a few bytes with random ones
            n = int(rng.integers(1, 9))
            buf[at : at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        elif kind == 2:  # truncate
            del buf[at:]
        elif kind == 3 and buf:  # duplicate a span
            n = int(rng.integers(1, 64))
            buf[at:at] = buf[at : at + n]
        elif kind == 4 and buf:  # delete a span
            del buf[at : at + int(rng.integers(1, 64))]
        else:  # a big 16- or 32-bit number (sizes, lengths, offsets live in headers)
            value = int(rng.choice([0xFF, 0xFFFF, 0x7FFF, 0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 40000]))
            width = 2 if rng.integers(0, 2) else 4
            order = "big" if rng.integers(0, 2) else "little"
            buf[at : at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, order)
    return bytes(buf)


def _rss_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about corrupt EXIF/TIFF tags: expected here
def test_mutated_images_end_in_documented_outcomes_with_bounded_memory():
    seeds = _seeds()
    assert {name.split("-")[0] for name in seeds} >= {"PNG", "JPEG", "GIF", "TIFF", "BMP"}
    transform = EvalTransform(S, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for data in seeds.values():  # the seeds themselves decode
        assert transform(decode_query_image(data, MAX_PIXELS, S)).shape == (3, S, S)
    rng = np.random.default_rng(SEED)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start_rss = _rss_kb("VmRSS")
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    names = list(seeds)
    started = time.monotonic()
    tried = 0
    for tried in range(1, FUZZ_INPUTS + 1):
        name = names[tried % len(names)]
        data = _mutate(seeds[name], rng)
        try:
            image = decode_query_image(data, MAX_PIXELS, S)
            assert image.mode == "RGB" and image.size[0] * image.size[1] <= MAX_PIXELS
            assert transform(image).shape == (3, S, S)
            outcomes["decoded"] += 1
        except QueryImageError as refused:
            if refused.status in (400, 413, 415):
                outcomes[str(refused.status)] += 1
            else:
                unexpected.append(f"{name} #{tried}: status {refused.status}: {refused}")
        except Exception as error:  # noqa: BLE001 - the point: anything else is a finding
            unexpected.append(f"{name} #{tried}: {type(error).__name__}: {error}")
        if time.monotonic() - started > MAX_SECONDS:
            break
    seconds = time.monotonic() - started
    peak_kb, end_kb = _rss_kb("VmHWM"), _rss_kb("VmRSS")
    growth_mb = (peak_kb - start_rss) / 1024 if peak_kb is not None and start_rss is not None else float("nan")
    print(
        f"\nfuzz: {tried} inputs from {len(seeds)} seeds in {seconds:.1f} s: {dict(sorted(outcomes.items()))}; "
        f"unexpected {len(unexpected)}; peak RSS +{growth_mb:.0f} MB (end {end_kb} kB)"
    )
    assert not unexpected, "\n".join(unexpected[:20])
    assert tried == FUZZ_INPUTS, f"only {tried} inputs within {MAX_SECONDS:g} s"
    assert outcomes["decoded"] > 0 and outcomes["400"] > 0 and outcomes["415"] > 0  # the mutations reach all paths
    if peak_kb is not None and start_rss is not None:
        assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB"


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF"])
def test_a_header_claiming_a_huge_thin_image_is_refused_before_decoding(fmt):
    # a real 20000 x 1 image of each format: small on disk, 731429 x 37 once resized at 32 px (27 M pixels)
    buffer = io.BytesIO()
    Image.new("L" if fmt != "GIF" else "P", (20_000, 1)).save(buffer, format=fmt)
    with pytest.raises(QueryImageError) as refused:
        decode_query_image(buffer.getvalue(), MAX_PIXELS, S)
    assert refused.value.status == 413 and "731429x37" in str(refused.value)
