"""torchvision's ``ColorJitter`` as compiled passes (numba): the same 8-bit pixels, several times faster.

:mod:`raml.data.color_jitter` computes torchvision's PIL arithmetic with numpy (one full-array pass per step,
~20 passes for the hue) and stays the readable reference; this module runs the same arithmetic as one
compiled loop per drawn step (over cache-sized chunks of the pixels, the output written in place after the
first step), each step rounding and clipping to 8 bits. It gives exactly the pixels of
:func:`raml.data.color_jitter.jitter_pixels` (tested on random draws, orders, shapes and edge colours; the hue
over all ``2**24`` colours).

What each step computes (the arithmetic of :mod:`raml.data.color_jitter`, which documents PIL's):

- brightness, contrast: a 256-entry table built by :func:`raml.data.color_jitter._blend_lut` (numpy, float32 as
  PIL) and looked up per channel;
- saturation: PIL's blend with the pixel's luma ``L = (19595 R + 38470 G + 7471 B + 2**15) >> 16``:
  ``float32(L) + float32(s) * float32(x - L)``, then ``<= 0 -> 0``, ``>= 255 -> 255``, else truncated;
- hue: the tables of :func:`raml.data.color_jitter._hsv_tables` (PIL's 8-bit H and S, then the HSV -> RGB
  weights), ``floor(float32(V) * w + 0.5)`` in float32.

Contrast blends with the mean luma of the image as it is when contrast runs, a whole-image reduction: the
step before contrast also sums the luma of its output (or, when contrast comes first, a read-only pass sums
the input's luma), and the mean grey ``int(sum / n + 0.5)`` is computed as PIL does.

A flipped view is first mirrored into the output, and its steps run there in place. Nothing here allocates
per pixel or holds the GIL (``nogil``).

Compilation: the kernels are compiled on first use and cached on disk (``cache=True``, in ``__pycache__``
beside this file, or numba's user cache when that is not writable). The first call of a fresh install compiles
(about 1-2 s, docs/benchmarks.md); later processes load the cached machine code (milliseconds).

Contract: ``(H, W, 3)`` uint8 RGB in -> ``(H, W, 3)`` uint8 RGB out (a given array or a new one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from numba import njit

from raml.data.color_jitter import _hsv_tables, _hue_shift_of

logger = logging.getLogger(__name__)

__all__ = ["jitter_into", "warm_up"]

_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


@njit(cache=True, nogil=True, inline="always")
def _luma(r: int, g: int, b: int) -> int:
    return (19595 * r + 38470 * g + 7471 * b + 32768) >> 16


# Each step runs as tight compiled loops over the pixels (two table steps merged where they compose): a loop
# per step pipelines far better than one loop that dispatches on the drawn order per pixel (measured 2x
# slower), and the image (at most 600 kB at 448 px) stays in the L2 cache between steps. A step runs over
# chunks of _CHUNK pixels (a few kB, in the L1 cache): the step's loop over the flat bytes (the table and the
# saturation ones vectorised by the compiler), then, with ``want_luma``, a loop summing the output's luma (the
# grey of a contrast step that follows). A flipped view is mirrored into the output first and its first step
# runs there in place.


_CHUNK = 1024  # pixels per chunk (3 kB of pixels, a 4 kB luma buffer)


@njit(cache=True, nogil=True)
def _saturation_chunk(src: np.ndarray, dst: np.ndarray, factor: np.float32, grey: np.ndarray) -> None:
    """PIL's saturation blend over flat RGB bytes (``dst`` must not overlap ``src``), in two vectorised loops.

    PIL's blend with the pixel's luma ``L``: ``float32(L) + factor * float32(x - L)``, then ``<= 0 -> 0``,
    ``>= 255 -> 255``, else truncated (min/max then truncation). The luma of every pixel goes into ``grey``
    first, then the blend runs over the flat bytes (per pixel it is scalar, measured ~2.5x slower).
    """
    pixels = src.shape[0] // 3
    for i in range(pixels):
        j = 3 * i
        grey[i] = np.float32(_luma(np.int32(src[j]), np.int32(src[j + 1]), np.int32(src[j + 2])))
    low, high = np.float32(0.0), np.float32(255.0)
    for i in range(pixels):
        grey_f = grey[i]
        j = 3 * i
        for c in range(3):
            # float32(x) - float32(L) is float32(x - L): small integers, exact
            dst[j + c] = np.uint8(np.int32(min(max(grey_f + factor * (np.float32(src[j + c]) - grey_f), low), high)))


@njit(cache=True, nogil=True)
def _luma_sum_flat(pixels: np.ndarray) -> int:
    """The sum of the luma of flat RGB bytes."""
    total = 0
    for i in range(pixels.shape[0] // 3):
        j = 3 * i
        total += _luma(np.int32(pixels[j]), np.int32(pixels[j + 1]), np.int32(pixels[j + 2]))
    return total


@njit(cache=True, nogil=True, inline="always")
def _hue_pixel(r: int, g: int, b: int, shift: int, tables: tuple) -> tuple[int, int, int]:
    # PIL's 8-bit RGB -> HSV, H += shift modulo 256, HSV -> RGB, through the tables of _hsv_tables.
    hue_cr, sat, w_red, w_green, w_blue = tables
    top = max(r, max(g, b))
    h_cr = np.int32(hue_cr[(r - g + 255) * 511 + (g - b + 255)])  # H (low byte), max - min (high byte)
    key = (((h_cr + shift) & 255) << 8) | np.int32(sat[(h_cr & 0xFF00) | top])
    value, half = np.float32(top), np.float32(0.5)
    # truncation of a non-negative float: round(V * w) half up
    return (
        np.int32(w_red[key] * value + half),
        np.int32(w_green[key] * value + half),
        np.int32(w_blue[key] * value + half),
    )


@njit(cache=True, nogil=True)
def _pass_flat(
    kind: int, src: np.ndarray, dst: np.ndarray, lut: np.ndarray, factor: np.float32, shift: int, tables: tuple,
    want_luma: bool, in_place: bool,
) -> int:  # fmt: skip
    """One step (``kind`` 0: table, 1: saturation, 2: hue) over ``(N, 3)`` pixels; ``src`` may be ``dst``.

    In chunks of :data:`_CHUNK` pixels that stay in the L1 cache; the luma of each output chunk (``want_luma``)
    is summed in a separate loop the compiler vectorises.
    """
    total = 0
    pixels = src.shape[0]
    grey = np.empty(_CHUNK, dtype=np.float32)
    scratch = np.empty(3 * _CHUNK, dtype=np.uint8)
    for start in range(0, pixels, _CHUNK):
        stop = min(start + _CHUNK, pixels)
        chunk = dst[start:stop].reshape(-1)
        # in place (every step after the first), the chunk's input is copied aside first: loops that read and
        # write one array are not vectorised by the compiler (measured ~2.5x slower)
        chunk_src = src[start:stop].reshape(-1)
        if in_place:
            for j in range(chunk.shape[0]):
                scratch[j] = chunk[j]
            chunk_src = scratch[: chunk.shape[0]]
        if kind == 0:
            _lut_chunk(chunk_src, chunk, lut)
        elif kind == 1:
            _saturation_chunk(chunk_src, chunk, factor, grey)
        else:
            _hue_chunk(chunk_src, chunk, shift, tables)
        if want_luma:
            total += _luma_sum_flat(chunk)
    return total


@njit(cache=True, nogil=True)
def _lut_chunk(src: np.ndarray, dst: np.ndarray, lut: np.ndarray) -> None:
    """One 256-entry table on every byte."""
    for j in range(src.shape[0]):
        dst[j] = lut[src[j]]


@njit(cache=True, nogil=True)
def _hue_chunk(src: np.ndarray, dst: np.ndarray, shift: int, tables: tuple) -> None:
    """:func:`_hue_pixel` over flat RGB bytes."""
    for i in range(src.shape[0] // 3):
        j = 3 * i
        r, g, b = _hue_pixel(np.int32(src[j]), np.int32(src[j + 1]), np.int32(src[j + 2]), shift, tables)
        dst[j], dst[j + 1], dst[j + 2] = r, g, b


@njit(cache=True, nogil=True)
def _pass_mirrored(
    kind: int, src: np.ndarray, dst: np.ndarray, lut: np.ndarray, factor: np.float32, shift: int, tables: tuple,
    want_luma: bool,
) -> int:  # fmt: skip
    """:func:`_pass_flat` on ``(H, W, 3)`` pixels, reading ``src`` mirrored left to right into ``dst``.

    The pixels are first mirrored into ``dst``, then the step runs there in place (the loops of
    :func:`_pass_flat`, which the compiler vectorises, instead of a scalar mirrored loop).
    """
    height, width = src.shape[0], src.shape[1]
    for y in range(height):
        for x in range(width):
            for c in range(3):
                dst[y, x, c] = src[y, width - 1 - x, c]
    pixels = dst.reshape(height * width, 3)
    return _pass_flat(kind, pixels, pixels, lut, factor, shift, tables, want_luma, True)


def _active_ops(brightness: float, contrast: float, saturation: float, hue: float, order: Sequence[int]) -> list[int]:
    # As jitter_pixels: factors of 1 are exact identities of PIL's blends; a hue of exactly 0 is skipped as
    # ColorJitter(hue=0) skips it (PIL's HSV round trip at shift 0 is not an identity).
    active = {_BRIGHTNESS: brightness != 1.0, _CONTRAST: contrast != 1.0, _SATURATION: saturation != 1.0}
    active[_HUE] = hue != 0.0
    return [op for op in order if active[op]]


def jitter_into(
    src: np.ndarray,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    order: Sequence[int] = (0, 1, 2, 3),
    *,
    flip: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """torchvision's ``ColorJitter`` with fixed factors and order (optionally after a horizontal flip), compiled.

    Equals ``jitter_pixels(src[:, ::-1] if flip else src, ...)`` of :mod:`raml.data.color_jitter` bit for bit.

    Args:
        src: ``(H, W, 3)`` uint8 RGB pixels (not modified; any strides).
        brightness: Brightness factor (1 = unchanged).
        contrast: Contrast factor (1 = unchanged).
        saturation: Saturation factor (1 = unchanged).
        hue: Hue shift in turns, in [-0.5, 0.5] (0 = unchanged).
        order: Permutation of ``(0, 1, 2, 3)``: the order of brightness, contrast, saturation, hue.
        flip: Mirror the pixels left to right before the jitter.
        out: Optional ``(H, W, 3)`` uint8 array to write into (must not overlap ``src``); a new one if None.

    Returns:
        ``out`` (or the new array), the jittered pixels.

    Raises:
        ValueError: On pixels that are not ``(H, W, 3)`` uint8, a bad order, a hue outside [-0.5, 0.5] or an
            ``out`` of another shape or dtype.
    """
    src = np.asarray(src)
    if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3:
        raise ValueError(f"src must be (H, W, 3) uint8 RGB, got {src.dtype} {src.shape}.")
    if sorted(order) != [0, 1, 2, 3]:
        raise ValueError(f"order must be a permutation of (0, 1, 2, 3), got {tuple(order)!r}.")
    if not -0.5 <= hue <= 0.5:
        raise ValueError(f"hue must lie in [-0.5, 0.5] (turns), got {hue!r}.")
    if out is None:
        out = np.empty(src.shape, dtype=np.uint8)
    elif out.shape != src.shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {src.shape} uint8 array, got {out.dtype} {out.shape}.")
    elif np.may_share_memory(out, src):
        raise ValueError("out must not overlap src: the first pass reads src while it writes out.")
    if src.size == 0:
        return out
    ops = _active_ops(brightness, contrast, saturation, hue, order)
    if not ops:
        out[...] = src[:, ::-1] if flip else src
        return out
    src = np.ascontiguousarray(src)
    hue_cr, sat, (w_red, w_green, w_blue) = _hsv_tables()
    tables = (hue_cr, sat.reshape(-1), w_red, w_green, w_blue)
    factors = (np.float32(brightness), np.float32(contrast), np.float32(saturation))
    shift = _hue_shift_of(hue) if _HUE in ops else 0
    _jitter_steps(src, out, flip, np.array(ops, dtype=np.int64), *factors, shift, tables)
    return out


@njit(cache=True, nogil=True)
def _blend_table(base: int, factor: np.float32) -> np.ndarray:
    """PIL's blend of the constant ``base`` with every 8-bit value (``_blend_lut``, float32 as PIL)."""
    lut = np.empty(256, dtype=np.uint8)
    base_f = np.float32(base)
    for x in range(256):
        temp = base_f + factor * (np.float32(x) - base_f)
        lut[x] = 0 if temp <= 0 else (255 if temp >= 255 else np.int32(temp))
    return lut


@njit(cache=True, nogil=True)
def _jitter_steps(
    src: np.ndarray, out: np.ndarray, flip: bool, ops: np.ndarray, brightness: np.float32, contrast: np.float32,
    saturation: np.float32, shift: int, tables: tuple,
) -> None:  # fmt: skip
    """Run the active steps ``ops`` (codes of JITTER_OPS, in order) from ``src`` into ``out``."""
    pixels = src.shape[0] * src.shape[1]
    flat_src, flat_out = src.reshape(pixels, 3), out.reshape(pixels, 3)
    luma_sum = 0
    k = 0
    while k < ops.shape[0]:
        op, first = ops[k], k == 0
        kind = 0
        lut = np.empty(0, dtype=np.uint8)
        if op == 1:
            # Contrast blends with the mean luma of the image as it is now (PIL: int(mean + 0.5), the exact
            # integer sum divided in double): the previous step summed it; when contrast comes first, a
            # read-only pass over the input does.
            if first:
                luma_sum = _luma_sum_flat(flat_src.reshape(-1))
            lut = _blend_table(np.int64(np.float64(luma_sum) / np.float64(pixels) + 0.5), contrast)
            if k + 1 < ops.shape[0] and ops[k + 1] == 0:
                # A brightness right after it needs no grey: the two tables compose exactly into one step.
                lut = _blend_table(0, brightness)[lut]
                k += 1
        elif op == 0:
            lut = _blend_table(0, brightness)
        else:
            kind = 1 if op == 2 else 2
        want_luma = k + 1 < ops.shape[0] and ops[k + 1] == 1
        if first and flip:
            luma_sum = _pass_mirrored(kind, src, out, lut, saturation, shift, tables, want_luma)
        else:
            luma_sum = _pass_flat(
                kind, flat_src if first else flat_out, flat_out, lut, saturation, shift, tables, want_luma, not first
            )
        k += 1


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) the kernels for the inputs views give them.

    Writable and read-only sources (torch's resize, PIL's), flipped or not, contrast first or later, and the
    uint8 mix of :mod:`raml.data.mix_kernel`. Cached, this takes well under a second; a fresh install compiles
    (seconds, docs/benchmarks.md).
    """
    from raml.data.mix_kernel import lerp_uint8_into

    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    frozen = pixels.copy()
    frozen.flags.writeable = False
    for src in (pixels, frozen):
        for flip in (False, True):
            jitter_into(src, 1.1, 0.9, 1.1, 0.01, (1, 0, 2, 3), flip=flip)
            jitter_into(src, 1.1, 0.9, 1.1, 0.01, (3, 2, 1, 0), flip=flip)
    lerp_uint8_into(pixels, pixels, 0.5, np.empty(pixels.shape, dtype=np.float32))
