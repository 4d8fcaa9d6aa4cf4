"""torchvision's ``ColorJitter`` on PIL images, the reference's arithmetic, computed faster.

The reference (``AugFineGrainTS``) jitters each view with ``transforms.ColorJitter(brightness=.4,
contrast=.4, saturation=.4, hue=.1)`` on a PIL image, i.e. torchvision's PIL functional ops in a random order,
each rounding to 8-bit pixels (so each one clips):

- brightness ``b``: ``ImageEnhance.Brightness``, a blend with black: ``trunc(b * x)``, clipped to [0, 255];
- contrast ``c``: ``ImageEnhance.Contrast``, a blend with the grey ``m = int(mean(L) + 0.5)`` of the image at
  that point of the chain (``L`` = PIL's 8-bit luma, ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``):
  ``trunc(m + c * (x - m))``, clipped;
- saturation ``s``: ``ImageEnhance.Color``, a blend of each pixel with its own luma: ``trunc(L + s * (x - L))``;
- hue ``h``: PIL's RGB -> HSV conversion (8-bit H, S, V), ``H += uint8(int(h * 255))`` modulo 256, HSV -> RGB.

PIL blends in float32: ``in1 + alpha * (in2 - in1)`` with ``alpha = float32(factor)``, then truncates. This
module computes exactly the same 8-bit results (tested against torchvision's functional ops, and the hue over
all 2**24 colours), faster than PIL:

- brightness and contrast are per-value maps, applied as one 256-entry lookup table (``Image.point``, PIL's C)
  built with PIL's float32 arithmetic, instead of a blend with a whole degenerate image;
- saturation is PIL's own blend with the luma image (``Image.blend``, as ``ImageEnhance.Color`` does);
- hue skips PIL's two per-pixel float conversions (``RGB -> HSV -> RGB``, most of ``ColorJitter``'s time):
  PIL's 8-bit H depends only on which channel is the largest and on the other two channels' distances to it,
  and its S only on ``max - min`` and ``max``, so both come from small tables (3 x 256 x 256 and 256 x 256
  entries) computed once with PIL's float / double arithmetic; PIL's HSV -> RGB gives each channel
  ``round(V * w)`` with a weight ``w`` that depends only on the shifted H and on S (which of V, p, q, t goes to
  which channel is decided by H's sector), so the three weights come from one 256 x 256 x 3 table.

Contract: RGB ``PIL.Image`` + factors -> RGB ``PIL.Image`` of the same size (a new image).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["JITTER_OPS", "color_jitter", "hue_shift", "jitter_pixels"]

#: The four operations, in the index order of torchvision's ``ColorJitter.get_params`` permutation.
JITTER_OPS: tuple[str, ...] = ("brightness", "contrast", "saturation", "hue")


def _check_rgb(img: Image.Image) -> None:
    if not isinstance(img, Image.Image):
        raise TypeError(f"Expected a PIL image, got {type(img).__name__}.")
    if img.mode != "RGB":
        raise ValueError(f"Expected an RGB image, got mode {img.mode!r}; convert it with img.convert('RGB').")


def _blend_lut(base: int, factor: float) -> np.ndarray:
    """PIL's ``blend(constant base, image, factor)`` for every 8-bit value: a ``(256,)`` uint8 table.

    ``(float)base + (float)factor * (float)(x - base)`` in float32, then ``<= 0 -> 0``, ``>= 255 -> 255``,
    else truncated (PIL's ``ImagingBlend``).
    """
    x = np.arange(256, dtype=np.float32)
    alpha = np.float32(factor)
    base32 = np.float32(base)
    temp = base32 + alpha * (x - base32)  # each step rounded to float32, as in C
    return np.where(temp <= 0, 0, np.where(temp >= 255, 255, np.trunc(np.clip(temp, 0, 255)))).astype(np.uint8)


def _mean_grey(pixels: np.ndarray) -> int:
    """``int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)``: the grey ``ImageEnhance.Contrast`` blends with."""
    hist = np.asarray(Image.fromarray(pixels, "RGB").convert("L").histogram(), dtype=np.int64)
    return int(float((hist * np.arange(256)).sum()) / float(hist.sum()) + 0.5)


def _brightness(pixels: np.ndarray, factor: float) -> np.ndarray:
    return _blend_lut(0, factor).take(pixels)


def _contrast(pixels: np.ndarray, factor: float) -> np.ndarray:
    return _blend_lut(_mean_grey(pixels), factor).take(pixels)


def _saturation(pixels: np.ndarray, factor: float) -> np.ndarray:
    img = Image.fromarray(pixels, "RGB")
    return np.asarray(Image.blend(img.convert("L").convert("RGB"), img, factor))


@functools.cache
def _hsv_tables() -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """PIL's 8-bit RGB <-> HSV arithmetic as tables (see the module docstring).

    Returns:
        ``hue_cr``: ``(511 * 511,)`` uint16 by ``(R - G + 255) * 511 + (G - B + 255)``: PIL's H (low byte) and
        ``max - min`` (high byte); both depend only on the channel differences. ``sat``: ``(65536,)`` uint8,
        PIL's S by ``(max - min) * 256 + max``. ``weights``: three ``(65536,)`` float32 tables, the R, G, B
        weights ``w`` of ``round(V * w)`` by ``H * 256 + S``.
    """
    f32, f64 = np.float32, np.float64
    # Every difference pair (R - G, G - B), realised by the darkest colour that has it (min channel 0).
    diffs = np.arange(-255, 256)
    rg, gb = np.meshgrid(diffs, diffs, indexing="ij")
    r, g, b = rg + gb, gb, np.zeros_like(gb)
    low = np.minimum(np.minimum(r, g), b)
    r, g, b = r - low, g - low, b - low  # may exceed 255 for pairs no 8-bit colour has (never looked up)
    top = np.maximum(np.maximum(r, g), b)
    cr = top  # max - min, the min channel being 0 now
    crf = np.where(cr > 0, cr, 1).astype(f32)
    rc, gc, bc = ((top - c).astype(f32) / crf for c in (r, g, b))
    # PIL's rgb2hsv: R largest (tested first): h = bc - gc in float; else G: h = 2.0 + rc - bc, else B:
    # h = 4.0 + gc - rc, both in double and stored in a float; h = fmod(h / 6.0 + 1.0, 1.0) in double,
    # stored in a float; H = (int)(h * 255.0); H = S = 0 for greys.
    h_r = bc - gc
    h_g = ((2.0 + rc.astype(f64)) - bc.astype(f64)).astype(f32)
    h_b = ((4.0 + gc.astype(f64)) - rc.astype(f64)).astype(f32)
    h = np.where(r == top, h_r, np.where(g == top, h_g, h_b))
    h = np.fmod(h.astype(f64) / 6.0 + 1.0, 1.0).astype(f32)
    hue = np.where(cr > 0, np.clip((h.astype(f64) * 255.0).astype(np.int64), 0, 255), 0)
    hue_cr = (hue + (np.clip(cr, 0, 255) << 8)).astype(np.uint16).reshape(-1)
    # S = (int)((cr / (float)max) * 255.0)
    levels = np.arange(256)
    crs, tops = np.meshgrid(levels, levels, indexing="ij")
    with np.errstate(divide="ignore", invalid="ignore"):
        s = crs.astype(f32) / np.where(tops > 0, tops, 1).astype(f32)
    sat = np.where(crs > 0, np.clip((s.astype(f64) * 255.0).astype(np.int64), 0, 255), 0).astype(np.uint8)
    # PIL's hsv2rgb: i = floor(H * 6.0 / 255.0); f = H * 6.0 / 255.0 - i (a float); fs = S / 255.0 (a float);
    # p = round(V * (1.0 - fs)), q = round(V * (1.0 - fs * f)), t = round(V * (1.0 - fs * (1.0 - f)));
    # by sector i % 6 the channels (R, G, B) are (V,t,p) (q,V,p) (p,V,t) (p,q,V) (t,p,V) (V,p,q).
    hs, ss = np.meshgrid(levels, levels, indexing="ij")
    x = hs.astype(f64) * 6.0 / 255.0
    i = np.floor(x).astype(np.int64)
    f = (x - i).astype(f32)
    fs = (ss.astype(f64) / 255.0).astype(f32)
    candidates = np.stack(
        [
            np.ones_like(x),
            1.0 - fs.astype(f64),
            1.0 - (fs * f).astype(f64),  # fs * f is a float product in C
            1.0 - fs.astype(f64) * (1.0 - f.astype(f64)),
        ],
        axis=-1,
    )
    channel_source = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])  # of V,p,q,t
    weights = np.take_along_axis(candidates, channel_source[i % 6], axis=-1).reshape(-1, 3).astype(f32)
    # float32 weights give PIL's rounding for all 2**24 (H, S, V) (tested): round(V * w) = floor(V * w + 0.5)
    return hue_cr, sat, tuple(np.ascontiguousarray(weights[:, c]) for c in range(3))


def _hue_shift_of(hue_factor: float) -> int:
    """torchvision's shift of the 8-bit H channel: ``np.int32(hue_factor * 255).astype(np.uint8)``."""
    return int(np.int32(hue_factor * 255).astype(np.uint8))


def hue_shift(pixels: np.ndarray, hue_factor: float) -> np.ndarray:
    """torchvision's PIL ``adjust_hue`` on ``(..., 3)`` uint8 RGB pixels: the same 8-bit result.

    Args:
        pixels: ``(..., 3)`` uint8 RGB values.
        hue_factor: The hue shift in turns, in [-0.5, 0.5].

    Returns:
        A new ``(..., 3)`` uint8 array.
    """
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor must lie in [-0.5, 0.5] (turns), got {hue_factor!r}.")
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.shape[-1:] != (3,):
        raise ValueError(f"pixels must be (..., 3) uint8 RGB, got {pixels.dtype} {pixels.shape}.")
    hue_cr, sat, weights = _hsv_tables()
    flat = pixels.reshape(-1, 3)
    x = flat.astype(np.int32)
    key = x[:, 0] - x[:, 1]
    key *= 511
    key += x[:, 1]
    key -= x[:, 2]
    key += 255 * 511 + 255
    h_cr = hue_cr.take(key)
    top = np.maximum(np.maximum(x[:, 0], x[:, 1]), x[:, 2])
    sat_key = (h_cr >> 8).astype(np.int32)
    sat_key <<= 8
    sat_key |= top
    h = h_cr.astype(np.uint8)  # the low byte
    h += np.uint8(_hue_shift_of(hue_factor))  # modulo 256, as torchvision's uint8 addition
    rgb_key = h.astype(np.int32)
    rgb_key <<= 8
    rgb_key |= sat.take(sat_key)
    value = top.astype(np.float32)
    out = np.empty_like(flat)
    for c in range(3):
        channel = weights[c].take(rgb_key)
        channel *= value
        channel += 0.5
        out[:, c] = channel  # truncation of non-negative values: floor(V * w + 0.5)
    return out.reshape(pixels.shape)


def jitter_pixels(
    pixels: np.ndarray,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    order: Sequence[int] = (0, 1, 2, 3),
) -> np.ndarray:
    """torchvision's ``ColorJitter`` with fixed factors and order, on ``(H, W, 3)`` uint8 RGB pixels.

    Args:
        pixels: ``(H, W, 3)`` uint8 RGB pixels (not modified).
        brightness: Brightness factor (1 = unchanged).
        contrast: Contrast factor (1 = unchanged).
        saturation: Saturation factor (1 = unchanged).
        hue: Hue shift in turns (0 = unchanged).
        order: Permutation of ``(0, 1, 2, 3)``: the order in which the operations of :data:`JITTER_OPS` run
            (``ColorJitter.get_params``' ``fn_idx``).

    Returns:
        ``(H, W, 3)`` uint8, a new array.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be (H, W, 3) uint8 RGB, got {pixels.dtype} {pixels.shape}.")
    if sorted(order) != [0, 1, 2, 3]:
        raise ValueError(f"order must be a permutation of (0, 1, 2, 3), got {tuple(order)!r}.")
    out = np.ascontiguousarray(pixels)
    for op in order:
        # Factors of 1 leave PIL's blends exact identities, so skipping them is exact. A hue of exactly 0 is
        # skipped as ColorJitter(hue=0) skips it (a drawn hue is 0.0 with probability ~2**-24; PIL's HSV
        # round trip at shift 0 is not an identity).
        if op == 0 and brightness != 1.0:
            out = _brightness(out, brightness)
        elif op == 1 and contrast != 1.0:
            out = _contrast(out, contrast)
        elif op == 2 and saturation != 1.0:
            out = _saturation(out, saturation)
        elif op == 3 and hue != 0.0:
            out = hue_shift(out, hue)
    return out.copy() if out is pixels else out


def color_jitter(
    img: Image.Image,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    order: Sequence[int] = (0, 1, 2, 3),
) -> Image.Image:
    """:func:`jitter_pixels` on a PIL RGB image: torchvision's ``ColorJitter`` with fixed factors and order.

    Returns:
        The jittered RGB image (a new image).
    """
    _check_rgb(img)
    return Image.fromarray(jitter_pixels(np.asarray(img), brightness, contrast, saturation, hue, order), "RGB")
