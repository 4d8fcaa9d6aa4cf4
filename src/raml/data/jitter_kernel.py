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
- hue: PIL's 8-bit RGB -> HSV, ``H += shift`` modulo 256, HSV -> RGB, each conversion computed with PIL's float32
  and double steps (:func:`_hsv_of`, :func:`_rgb_of`: the values of :func:`raml.data.color_jitter._hsv_tables`
  without looking them up: 1.3 MB of tables that do not fit the L2 cache, and five dependent look-ups per pixel
  that the compiler cannot vectorise), ``floor(float32(V) * w + 0.5)`` in float32; per chunk one vectorised
  loop to H, S, V and one back. Equal to the tables on every colour at every shift (tested exhaustively).

Contrast blends with the mean luma of the image as it is when contrast runs, a whole-image reduction: the
step before contrast also sums the luma of its output (or, when contrast comes first, a read-only pass sums
the input's luma), and the mean grey ``int(sum / n + 0.5)`` is computed as PIL does.

A flipped view is first mirrored into the output, and its steps run there in place. Nothing here allocates
per pixel or holds the GIL (``nogil``).

Compilation: the kernels are compiled on first use and cached on disk (``cache=True``, in ``__pycache__``
beside this file, or numba's user cache when that is not writable). The first call of a fresh install compiles
(4.5 CPU s on a 2-core machine, docs/benchmarks.md); later processes load the cached machine code (~0.25 s). A
writable source is passed to the kernels as a read-only view, so that they are compiled for one source type only
(numba types the two apart; compiling both took 5.8-6.1 s).

Contract: ``(H, W, 3)`` uint8 RGB in -> ``(H, W, 3)`` uint8 RGB out (a given array or a new one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from numba import njit

from raml.data.color_jitter import _hue_shift_of

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
def _hsv_of(r: int, g: int, b: int) -> tuple[int, int, int]:
    """PIL's 8-bit RGB -> HSV (``rgb2hsv``), computed: its float32 / double steps, in registers, no tables.

    ``H``: the two channel distances to the largest channel that PIL's formula for it uses, each divided by
    ``max - min`` in float32, ``h = (base + first) - second`` in double stored in a float (R largest: base 0,
    which is exactly PIL's float32 ``bc - gc``; G: 2; B: 4), ``fmod(h / 6 + 1, 1)`` (for ``h / 6 + 1`` in
    [0.8, 1.9) that is ``x - 1`` when ``x >= 1``), stored in a float, ``(int)(h * 255.0)``. ``S``:
    ``(int)((float)cr / (float)max * 255.0)``; both 0 for greys. Dividing by the constants 6 and 255 is a
    multiplication by their reciprocal here: equal on every 8-bit colour (tested exhaustively).
    """
    top = max(r, max(g, b))
    cr = top - min(r, min(g, b))
    crf = np.float32(max(cr, 1))
    r_top = r == top
    g_top = g == top
    first = np.float32(top - (b if r_top else (r if g_top else g))) / crf
    second = np.float32(top - (g if r_top else (b if g_top else r))) / crf
    base = 0.0 if r_top else (2.0 if g_top else 4.0)
    h = np.float32((base + np.float64(first)) - np.float64(second))
    x = np.float64(h) * (1.0 / 6.0) + 1.0
    x = x - 1.0 if x >= 1.0 else x
    hue = np.int32(np.float64(np.float32(x)) * 255.0)
    sat = np.int32(np.float64(np.float32(cr) / np.float32(max(top, 1))) * 255.0)
    return (hue if cr > 0 else 0), (sat if cr > 0 else 0), top


@njit(cache=True, nogil=True, inline="always")
def _rgb_of(hue: int, sat: int, value: int) -> tuple[int, int, int]:
    """PIL's 8-bit HSV -> RGB (``hsv2rgb``), computed: the weights of :func:`raml.data.color_jitter._hsv_tables`.

    ``x = H * 6 / 255``, sector ``i = floor(x)`` (6 is 0), ``f = (float)(x - i)``, ``fs = (float)(S / 255)``;
    ``p = 1 - fs``, ``q = 1 - fs * f`` (a float product), ``t = 1 - fs * (1 - f)``, each in double stored in a
    float; by sector the channels are (V,t,p) (q,V,p) (p,V,t) (p,q,V) (t,p,V) (V,p,q), each ``round(V * w)`` as
    ``(int)(w * float(V) + 0.5)`` in float32 (V's weight 1: V itself).
    """
    x = np.float64(hue) * (6.0 / 255.0)
    sector = np.int32(x)
    f = np.float32(x - np.float64(sector))
    fs = np.float32(np.float64(sat) * (1.0 / 255.0))
    one = np.float32(1.0)
    p = np.float32(1.0 - np.float64(fs))
    q = np.float32(1.0 - np.float64(fs * f))
    t = np.float32(1.0 - np.float64(fs) * (1.0 - np.float64(f)))
    sector = sector if sector < 6 else 0
    w_red = one if (sector == 0 or sector == 5) else (q if sector == 1 else (t if sector == 4 else p))
    w_green = t if sector == 0 else (one if (sector == 1 or sector == 2) else (q if sector == 3 else p))
    w_blue = p if sector <= 1 else (t if sector == 2 else (q if sector == 5 else one))
    v, half = np.float32(value), np.float32(0.5)
    # truncation of a non-negative float: round(V * w) half up
    return np.int32(w_red * v + half), np.int32(w_green * v + half), np.int32(w_blue * v + half)


@njit(cache=True, nogil=True)
def _hsv_chunk(src: np.ndarray, hue: np.ndarray, sat: np.ndarray, value: np.ndarray) -> None:
    """:func:`_hsv_of` of every pixel of flat RGB bytes into three int32 arrays (a loop the compiler vectorises)."""
    for i in range(src.shape[0] // 3):
        j = 3 * i
        hue[i], sat[i], value[i] = _hsv_of(np.int32(src[j]), np.int32(src[j + 1]), np.int32(src[j + 2]))


@njit(cache=True, nogil=True)
def _rgb_chunk(hue: np.ndarray, sat: np.ndarray, value: np.ndarray, shift: int, dst: np.ndarray) -> None:
    """:func:`_rgb_of` of ``((H + shift) mod 256, S, V)`` of every pixel into flat RGB bytes (vectorised)."""
    for i in range(hue.shape[0]):
        j = 3 * i
        dst[j], dst[j + 1], dst[j + 2] = _rgb_of((hue[i] + shift) & 255, sat[i], value[i])


@njit(cache=True, nogil=True)
def _pass_flat(
    kind: int, src: np.ndarray, dst: np.ndarray, lut: np.ndarray, factor: np.float32, shift: int,
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
    hsv = np.empty(3 * _CHUNK, dtype=np.int32)
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
            _hue_chunk(chunk_src, chunk, shift, hsv)
        if want_luma:
            total += _luma_sum_flat(chunk)
    return total


@njit(cache=True, nogil=True)
def _lut_chunk(src: np.ndarray, dst: np.ndarray, lut: np.ndarray) -> None:
    """One 256-entry table on every byte."""
    for j in range(src.shape[0]):
        dst[j] = lut[src[j]]


@njit(cache=True, nogil=True)
def _hue_chunk(src: np.ndarray, dst: np.ndarray, shift: int, hsv: np.ndarray) -> None:
    """PIL's HSV round trip with ``H += shift`` over flat RGB bytes: H, S, V of the chunk into ``hsv`` (int32,
    three thirds), then back to RGB; two loops the compiler vectorises (one loop doing both was measured slower)."""
    pixels = src.shape[0] // 3
    third = hsv.shape[0] // 3
    hue, sat, value = hsv[:pixels], hsv[third : third + pixels], hsv[2 * third : 2 * third + pixels]
    _hsv_chunk(src, hue, sat, value)
    _rgb_chunk(hue, sat, value, shift, dst)


@njit(cache=True, nogil=True)
def _pass_mirrored(
    kind: int, src: np.ndarray, dst: np.ndarray, lut: np.ndarray, factor: np.float32, shift: int,
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
    return _pass_flat(kind, pixels, pixels, lut, factor, shift, want_luma, True)


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
    if src.flags.writeable:
        # numba types a read-only array apart from a writable one and compiles each kernel for both; a read-only
        # view of a writable source (no copy; the kernels never write to src) leaves one variant to compile
        src = src.view()
        src.flags.writeable = False
    factors = (np.float32(brightness), np.float32(contrast), np.float32(saturation))
    shift = _hue_shift_of(hue) if _HUE in ops else 0
    _jitter_steps(src, out, flip, np.array(ops, dtype=np.int64), *factors, shift)
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
    saturation: np.float32, shift: int,
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
            luma_sum = _pass_mirrored(kind, src, out, lut, saturation, shift, want_luma)
        else:
            luma_sum = _pass_flat(
                kind, flat_src if first else flat_out, flat_out, lut, saturation, shift, want_luma, not first
            )
        k += 1


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) the kernels for the inputs views give them.

    Writable and read-only sources (torch's resize, PIL's; both reach the kernels read-only), flipped or not,
    contrast first or later, and the uint8 mix of :mod:`raml.data.mix_kernel`. Cached, this takes well under a
    second; a fresh install compiles (seconds, docs/benchmarks.md).
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
