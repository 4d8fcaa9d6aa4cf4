"""The reference's mixup of uint8 views on the CPU as one compiled pass: ``lam * view + (1 - lam) * partner``.

:func:`raml.data.views.mix_partner_views` mixes each view with its partner. On uint8 pixels torch needs three
passes over float32 copies (convert the partner into the output, convert the view, ``lerp_``); this module
reads both uint8 views once and writes the float32 result once, with torch's own ``lerp`` formula
(``start + w * (end - start)`` for ``w < 0.5``, else ``end - (end - start) * (1 - w)``, each step rounded to
float32; torch's vectorised kernel fuses a multiply-add, so the two may differ in the last bit), so ``w = 0``
gives the partner and ``w = 1`` the view exactly.

Contract: two C-contiguous uint8 arrays of one shape and a float32 array of that shape to write into.
Compiled on first use and cached on disk (``cache=True``), as :mod:`raml.data.jitter_kernel`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["lerp_uint8_into"]


@njit(cache=True, nogil=True)
def _lerp_flat(start: np.ndarray, end: np.ndarray, out: np.ndarray, weight: np.float32) -> None:
    one = np.float32(1.0)
    if weight < np.float32(0.5):
        for i in range(out.shape[0]):
            a = np.float32(start[i])
            out[i] = a + weight * (np.float32(end[i]) - a)
    else:
        rest = one - weight
        for i in range(out.shape[0]):
            b = np.float32(end[i])
            out[i] = b - (b - np.float32(start[i])) * rest


def lerp_uint8_into(start: np.ndarray, end: np.ndarray, weight: float, out: np.ndarray) -> np.ndarray:
    """``out = torch.lerp(start.float(), end.float(), weight)`` for uint8 inputs, in one pass (torch's formula,
    each step rounded to float32; torch's fused multiply-add may differ in the last bit).

    Args:
        start: C-contiguous uint8 array (the partner view: the result at ``weight = 0``).
        end: C-contiguous uint8 array of the same shape (the view: the result at ``weight = 1``).
        weight: The mixing weight in [0, 1].
        out: C-contiguous float32 array of the same shape, written in place.

    Returns:
        ``out``.

    Raises:
        ValueError: On shapes, dtypes or layouts other than those above.
    """
    for name, array, dtype in (("start", start, np.uint8), ("end", end, np.uint8), ("out", out, np.float32)):
        if array.dtype != dtype or array.shape != start.shape or not array.flags.c_contiguous:
            raise ValueError(
                f"{name} must be a C-contiguous {np.dtype(dtype)} array of shape {start.shape}, "
                f"got {array.dtype} {array.shape} (contiguous: {array.flags.c_contiguous})."
            )
    _lerp_flat(start.reshape(-1), end.reshape(-1), out.reshape(-1), np.float32(weight))
    return out
