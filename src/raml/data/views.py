"""Coupled views for distillation (SPEC section 5, ``ts_aug``): one augmentation, two resolutions.

Tensor contract:

- :func:`render_coupled_views`: RGB ``PIL.Image`` + ``P`` :class:`ViewParams` -> student ``(P, 3, QR, QR)``
  uint8 and teacher ``(P, 3, DR, DR)`` uint8 (un-normalised pixels), the same crop box, flip and jitter
  rendered at each resolution.
- :class:`CoupledViewDataset`: ``i`` -> ``((P, 3, QR, QR) uint8, (P, 3, DR, DR) uint8, i)``; the default
  collate stacks these to ``(B, P, 3, QR, QR)`` and ``(B, P, 3, DR, DR)``. With ``partners=True`` (the
  reference's mixup): ``i`` -> ``(student, teacher, partner_student, partner_teacher, lam, i)``, the partner
  views in the same shapes and ``lam`` float32 ``(P,)``. An item ``(i, S)`` renders the student views at
  ``S`` instead of QR (several query sizes, one per batch: :mod:`raml.data.sizes`), with the same draws.
- :meth:`CoupledViewDataset.batch` (or the dataset indexed with a list of items): the items collated, equal
  to the default collation of the items bit for bit and stride for stride, rendered straight into the batch
  (:func:`batch_loader_arguments` makes a ``DataLoader`` load it so).
- :func:`mix_partner_views`: views and partner views ``(B, P, 3, S, S)`` (uint8 or float) and ``lam``
  ``(B, P)`` -> float ``lam * view + (1 - lam) * partner`` at both resolutions (the reference's mixup).
- :func:`mixup_views`: float ``(B, P, 3, QR, QR)`` and ``(B, P, 3, DR, DR)`` -> the same shapes, each view
  mixed with a view of another image of the batch, with the same partner and weight at both resolutions.

A view is a random resized crop box (scale 0.08-1, ratio 3/4-4/3, torchvision's ``RandomResizedCrop``
sampling rule including its fallback to a central crop after 10 failed tries), one horizontal flip decision
and one colour jitter (brightness, contrast, saturation 0.4, hue 0.1; factors and their random order drawn
as torchvision's ``ColorJitter`` draws them; with a generator in the state of torch's global RNG,
:func:`sample_view_params` returns exactly torchvision's parameters). Rendering decodes the image once.

By default (the reference's ``AugFineGrainTS``: ``RandomResizedCrop(imsize)`` and
``RandomResizedCrop(teacher_imsize)`` from the same seed, then ``RandomHorizontalFlip`` and ``ColorJitter``
at that size), each view is rendered at each resolution on its own:

1. the crop box resized straight to the size (QR for the student, DR for the teacher; antialiased bilinear,
   torchvision's default interpolation),
2. flipped,
3. jittered with torchvision's ``ColorJitter`` arithmetic on the 8-bit pixels at that size: the four
   operations in the drawn order, each rounding and clipping, hue through PIL's 8-bit HSV
   (:mod:`raml.data.color_jitter`'s arithmetic, bit for bit torchvision's result, run as compiled numba
   passes by :mod:`raml.data.jitter_kernel`, the flip folded into the first pass, written straight into
   the batch array).

With the ``"pil"`` backend the views are torchvision's pixels exactly (tested); with ``"torch"`` the resize
rounds differently (within one grey level), which the jitter's 8-bit HSV round trip can turn into a few
levels at single pixels (mean difference well under one level, tested).

``fused=True`` (``--fused-views``, ours, several times faster, not the reference's pixels) renders each view
once: crop, flip, the jitter as ONE affine colour transform (a 3x4 matrix applied by PIL's C ``convert``:
brightness ``b * x``; contrast ``c * x + (1 - c) * mean_grey``; saturation ``s * x + (1 - s) * grey(x)``;
hue a rotation by ``2 pi h`` about the grey axis, the linear counterpart of HSV's hue shift; one clip at the
end), applied to whichever of the crop and the DR view has fewer pixels, a resize to DR, and the student view
is the DR view resized to QR. Its differences from the reference (docs/fidelity.md): the student view goes
through two resizes (blurrier than the reference's single resize from the crop), hue is a rotation, not an
HSV shift, and values are clipped once, not after every step.

Two resize backends implement the same filter (PIL's antialiased bilinear): ``"pil"`` (PIL's C code) and
``"torch"`` (``F.interpolate(..., antialias=True)`` on uint8 channels-last pixels, torch's AVX2 port of
PIL's algorithm, several times faster). Their integer weights are rounded differently: the resized pixels
differ by at most one grey level (on ~1 % of the pixels of a noise image, hardly any on smooth ones).
``"pil"`` is the default of the batch-partner mode; ``"torch"`` is the default of the reference-partner mode,
which renders twice as many views.

The reference's mixup (``partners=True``, SPEC section 5): each view is mixed with a view of a random image
of the whole training set (drawn per view; it may be the image itself), rendered with the same random draws
as the view: the reference reseeds its RNGs with the view's seed before rendering the partner, so the
partner's crop box, flip and jitter are what the same sampling code draws, from the same seed, on the
partner's size. Here: the view's seed seeds a fresh generator for :func:`sample_view_params` on the image's
size and another on the partner's size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from raml.data.buffers import BufferPool
from raml.data.color_jitter import JITTER_OPS
from raml.data.images import load_image
from raml.data.jitter_kernel import jitter_into
from raml.data.mix_kernel import lerp_uint8_into

logger = logging.getLogger(__name__)

__all__ = [
    "COLOR_JITTER",
    "CROP_RATIO",
    "CROP_SCALE",
    "RESIZE_BACKENDS",
    "CoupledViewDataset",
    "PartnerDraws",
    "ViewParams",
    "batch_loader_arguments",
    "color_twist_matrix",
    "mix_partner_views",
    "mixup_views",
    "render_coupled_views",
    "sample_view_params",
]

CROP_SCALE: tuple[float, float] = (0.08, 1.0)
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
#: Jitter strengths: brightness, contrast, saturation factors in [1 - x, 1 + x]; hue shift in [-x, x] turns.
COLOR_JITTER: dict[str, float] = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
FLIP_PROBABILITY = 0.5
_CROP_TRIES = 10
# PIL's RGB -> L weights (ITU-R 601-2 luma), used by ImageEnhance.Color/Contrast and torchvision.
_LUMA = np.array([0.299, 0.587, 0.114])
#: Implementations of the antialiased bilinear resize (see the module docstring).
RESIZE_BACKENDS: tuple[str, ...] = ("pil", "torch")


@dataclass(frozen=True)
class ViewParams:
    """The random choices of one coupled view, independent of the output resolution.

    Attributes:
        top: First row of the crop box, in source pixels.
        left: First column of the crop box, in source pixels.
        height: Crop box height, in source pixels.
        width: Crop box width, in source pixels.
        flip: Whether the view is flipped horizontally.
        brightness: Brightness factor (1 = unchanged).
        contrast: Contrast factor (1 = unchanged).
        saturation: Saturation factor (1 = unchanged).
        hue: Hue shift in turns of the colour circle (0 = unchanged).
        order: Permutation of ``(0, 1, 2, 3)``: the order in which brightness, contrast, saturation, hue
            (indices into :data:`JITTER_OPS`) are applied.
    """

    top: int
    left: int
    height: int
    width: int
    flip: bool
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: tuple[int, ...] = (0, 1, 2, 3)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The crop box as PIL wants it: ``(left, upper, right, lower)``."""
        return (self.left, self.top, self.left + self.width, self.top + self.height)


# The draws below mirror torchvision's own calls (float32 uniforms, randint, randperm, rand) one for one,
# so that a generator in the same state as torch's global RNG yields exactly torchvision's parameters.
def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high, size=(1,), generator=generator))


def _sample_crop(width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's rule: 10 tries of (area share, log-uniform ratio), then a central crop."""
    area = width * height
    log_ratio = torch.log(torch.tensor(CROP_RATIO))
    for _ in range(_CROP_TRIES):
        target_area = area * _uniform(CROP_SCALE[0], CROP_SCALE[1], generator)
        ratio = float(torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)))
        crop_w = round(math.sqrt(target_area * ratio))
        crop_h = round(math.sqrt(target_area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = _randint(height - crop_h + 1, generator)
            left = _randint(width - crop_w + 1, generator)
            return top, left, crop_h, crop_w
    # Fallback: the largest central crop whose ratio is clamped into the allowed range.
    image_ratio = width / height
    if image_ratio < min(CROP_RATIO):
        crop_w, crop_h = width, round(width / min(CROP_RATIO))
    elif image_ratio > max(CROP_RATIO):
        crop_h, crop_w = height, round(height * max(CROP_RATIO))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def sample_view_params(width: int, height: int, generator: torch.Generator) -> ViewParams:
    """Draw one coupled view for an image of the given size.

    The draws follow torchvision's ``Compose([RandomResizedCrop, RandomHorizontalFlip, ColorJitter])``:
    the crop box, then the flip (p = 0.5), then the jitter order (a random permutation) and the brightness,
    contrast, saturation and hue factors.

    Args:
        width: Source image width in pixels.
        height: Source image height in pixels.
        generator: The source of randomness (seed it for reproducible views).

    Returns:
        The view's parameters.

    Raises:
        ValueError: If the size is not positive.
    """
    if isinstance(width, bool) or isinstance(height, bool) or int(width) != width or int(height) != height:
        raise ValueError(f"width and height must be integers, got {width!r} x {height!r}.")
    if width <= 0 or height <= 0:
        raise ValueError(f"The image must have a positive size, got {width} x {height} pixels.")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
    top, left, crop_h, crop_w = _sample_crop(int(width), int(height), generator)
    flip = bool(torch.rand(1, generator=generator).item() < FLIP_PROBABILITY)
    order = tuple(int(i) for i in torch.randperm(4, generator=generator))
    factors = {}
    for name in ("brightness", "contrast", "saturation"):
        strength = COLOR_JITTER[name]
        factors[name] = _uniform(max(0.0, 1.0 - strength), 1.0 + strength, generator)
    factors["hue"] = _uniform(-COLOR_JITTER["hue"], COLOR_JITTER["hue"], generator)
    return ViewParams(top=top, left=left, height=crop_h, width=crop_w, flip=flip, order=order, **factors)


def _hue_rotation(hue: float) -> np.ndarray:
    """3x3 rotation by ``2 pi hue`` about the grey axis; positive turns move red towards yellow (as HSV)."""
    theta = 2.0 * math.pi * hue
    u = np.full(3, 1.0 / math.sqrt(3.0))
    cross = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return math.cos(theta) * np.eye(3) + math.sin(theta) * cross + (1.0 - math.cos(theta)) * np.outer(u, u)


def color_twist_matrix(params: ViewParams, mean_rgb: Sequence[float]) -> np.ndarray:
    """The view's colour jitter as one affine map ``x -> A x + t`` on RGB in [0, 255].

    Args:
        params: The view (its jitter factors and order are used).
        mean_rgb: Mean colour of the image the jitter is applied to (for the contrast's mean grey).

    Returns:
        ``(3, 4)`` float64 array ``[A | t]``.
    """
    affine = np.eye(3)
    offset = np.zeros(3)
    mean = np.asarray(mean_rgb, dtype=np.float64)
    for op in params.order:
        name = JITTER_OPS[op]
        if name == "brightness":
            step, shift = params.brightness * np.eye(3), np.zeros(3)
        elif name == "contrast":
            # Blend with the mean grey of the image as it is at this point of the chain.
            mean_grey = float(_LUMA @ (affine @ mean + offset))
            step, shift = params.contrast * np.eye(3), np.full(3, (1.0 - params.contrast) * mean_grey)
        elif name == "saturation":
            step = params.saturation * np.eye(3) + (1.0 - params.saturation) * np.outer(np.ones(3), _LUMA)
            shift = np.zeros(3)
        else:
            step, shift = _hue_rotation(params.hue), np.zeros(3)
        affine, offset = step @ affine, step @ offset + shift
    return np.concatenate([affine, offset[:, None]], axis=1)


def _mean_rgb(img: Image.Image) -> list[float]:
    """Mean colour of an RGB image; the same floats as ``ImageStat.Stat(img).mean`` (exact integer sums)."""
    hist = np.asarray(img.histogram(), dtype=np.int64).reshape(3, 256)
    return ((hist * np.arange(256)).sum(axis=1) / hist.sum(axis=1)).tolist()


def _apply_twist(img: Image.Image, view: ViewParams) -> Image.Image:
    twist = color_twist_matrix(view, _mean_rgb(img))
    return img.convert("RGB", tuple(float(v) for v in twist.ravel()))


def _check_size(name: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {size!r}.")


def _check_backend(backend: str) -> None:
    if backend not in RESIZE_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, RESIZE_BACKENDS))}, got {backend!r}.")


def _check_sizes(student_size: int, teacher_size: int) -> None:
    _check_size("student_size", student_size)
    _check_size("teacher_size", teacher_size)
    if student_size > teacher_size:
        raise ValueError(
            f"student_size ({student_size}) must not exceed teacher_size ({teacher_size}): the student "
            "view is the small-resolution rendering of the teacher view (the teacher sees the large resolution)."
        )


def _resize_uint8(pixels: Tensor, size: int) -> Tensor:
    """``(h, w, 3)`` uint8 -> ``(size, size, 3)`` uint8: antialiased bilinear, torch's port of PIL's filter."""
    # (1, 3, h, w) with channels-last strides (batch stride included: (h*w*3, 1, w*3, 3)), no copy: the
    # layout of torch's fast uint8 kernel, which then returns channels-last too, so that the permute back to
    # (size, size, 3) is free. (permute(2, 0, 1).unsqueeze(0) would give a batch stride of 3, and the kernel
    # would return NCHW memory: a 3x slower resize plus a transposing copy.)
    nchw = pixels.unsqueeze(0).permute(0, 3, 1, 2)
    resized = F.interpolate(nchw, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].permute(1, 2, 0)


def _render_into(
    img: Image.Image,
    params: Sequence[ViewParams],
    student: np.ndarray,
    teacher: np.ndarray,
    slots: Sequence[int],
    backend: str,
    fused: bool,
    write: tuple[bool, bool] = (True, True),
) -> None:
    """Render ``params[k]`` of ``img`` into ``student[slots[k]]`` (QR, HWC uint8) and ``teacher[slots[k]]``.

    ``write`` = (student, teacher): a view not wanted is not rendered (``--uncoupled-views`` renders each side
    from its own draws), except that the fused renderer needs the DR view for the QR one; the pixels written
    are the same as with both.
    """
    if not any(write):
        raise ValueError("write must ask for the student's views, the teacher's, or both.")
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    pixels: Tensor | None = None  # the whole image as an (H, W, 3) tensor, made on first need (torch backend)
    for i, (slot, view) in enumerate(zip(slots, params, strict=True)):
        if not isinstance(view, ViewParams):
            raise TypeError(f"params[{i}] must be a ViewParams, got {type(view).__name__}.")
        left, top, right, bottom = view.box
        if view.width <= 0 or view.height <= 0 or left < 0 or top < 0 or right > width or bottom > height:
            raise ValueError(
                f"params[{i}] has crop box {view.box} outside the {width} x {height} image; draw the views "
                "with sample_view_params(img.width, img.height, generator) for this image."
            )
        if backend == "torch" and pixels is None:
            pixels = torch.from_numpy(np.array(img))
        if fused:
            _render_fused(img, pixels, view, student, teacher, slot, backend, write)
        else:
            _render_reference(img, pixels, view, student, teacher, slot, backend, write)


def _has_jitter(view: ViewParams) -> bool:
    return (view.brightness, view.contrast, view.saturation, view.hue) != (1.0, 1.0, 1.0, 0.0)


def _render_reference(
    img: Image.Image,
    pixels: Tensor | None,
    view: ViewParams,
    student: np.ndarray,
    teacher: np.ndarray,
    slot: int,
    backend: str,
    write: tuple[bool, bool] = (True, True),
) -> None:
    """The reference's view at each size: the crop box resized straight to the size, flipped, jittered there
    (only at the sizes ``write`` = (student, teacher) asks for)."""
    teacher_size, student_size = teacher.shape[1], student.shape[1]
    write_student, write_teacher = write
    crop = img.crop(view.box) if backend == "pil" else None
    sizes = [(teacher_size, teacher)] if write_teacher else []
    if write_student and not (write_teacher and student_size == teacher_size):
        sizes.append((student_size, student))
    for size, out in sizes:
        if crop is not None:
            resized = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
        else:
            left, top, right, bottom = view.box
            resized = _resize_uint8(pixels[top:bottom, left:right], size).numpy()
        if _has_jitter(view):
            # flip + torchvision's ColorJitter in compiled passes, written straight into the batch array
            factors = (view.brightness, view.contrast, view.saturation, view.hue)
            jitter_into(resized, *factors, view.order, flip=view.flip, out=out[slot])
        else:
            out[slot] = resized[:, ::-1] if view.flip else resized
    if write_student and write_teacher and student_size == teacher_size:
        student[slot] = teacher[slot]


def _render_fused(
    img: Image.Image,
    pixels: Tensor | None,
    view: ViewParams,
    student: np.ndarray,
    teacher: np.ndarray,
    slot: int,
    backend: str,
    write: tuple[bool, bool] = (True, True),
) -> None:
    """``fused=True``: the crop resized to DR with the jitter as one colour matrix, then DR -> QR (the QR view
    only when ``write`` = (student, teacher) asks for it; the DR view is rendered either way)."""
    write_student = write[0]
    teacher_size, student_size = teacher.shape[1], student.shape[1]
    left, top, right, bottom = view.box
    # Flip and the colour twist commute with the (linear, normalised, mirror-symmetric) resize, so they run
    # on whichever of the crop and the DR view has fewer pixels; only the rounding and the final clipping
    # differ between the two orders.
    jitter = _has_jitter(view)
    twist_first = view.width * view.height <= teacher_size * teacher_size
    if backend == "pil":
        crop = img.crop(view.box)
        if view.flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if jitter and twist_first:
            crop = _apply_twist(crop, view)
        big = crop.resize((teacher_size, teacher_size), Image.Resampling.BILINEAR)
        if jitter and not twist_first:
            big = _apply_twist(big, view)
        teacher[slot] = np.asarray(big)
        if not write_student:
            return
        if student_size == teacher_size:
            student[slot] = teacher[slot]
        else:
            student[slot] = np.asarray(big.resize((student_size, student_size), Image.Resampling.BILINEAR))
        return
    if jitter and twist_first:
        # The twist is PIL's C colour matrix: crop, flip and twist the (small) crop in PIL.
        crop = img.crop(view.box)
        if view.flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        source = torch.from_numpy(np.array(_apply_twist(crop, view)))
    else:
        source = pixels[top:bottom, left:right]  # a view, no copy
        if view.flip:
            source = source.flip(1)
    big_pixels = _resize_uint8(source, teacher_size)
    if jitter and not twist_first:
        twisted = _apply_twist(Image.fromarray(big_pixels.contiguous().numpy()), view)
        big_pixels = torch.from_numpy(np.array(twisted))
    teacher_slot = torch.from_numpy(teacher[slot])
    teacher_slot.copy_(big_pixels)
    if not write_student:
        return
    if student_size == teacher_size:
        student[slot] = teacher[slot]
    else:
        torch.from_numpy(student[slot]).copy_(_resize_uint8(teacher_slot, student_size))


def _to_chw(views: np.ndarray) -> Tensor:
    # (P, H, W, 3) -> (P, 3, H, W) as a permuted view (channels-last memory): no transposing copy here;
    # the DataLoader's stacking keeps the layout, and .float() / .contiguous() on the device are cheap.
    return torch.from_numpy(views).permute(0, 3, 1, 2)


def render_coupled_views(
    img: Image.Image,
    params: Sequence[ViewParams],
    student_size: int,
    teacher_size: int,
    *,
    backend: str = "pil",
    fused: bool = False,
) -> tuple[Tensor, Tensor]:
    """Render the coupled views of one decoded image at the student (QR) and teacher (DR) resolutions.

    By default each view is rendered as the reference renders it at each resolution: the crop box resized
    straight to the size (antialiased bilinear), flipped, then torchvision's ``ColorJitter`` arithmetic
    (:mod:`raml.data.color_jitter`). ``fused=True``: the faster approximation (module docstring).

    Args:
        img: The decoded image (converted to RGB if it is in another mode).
        params: One :class:`ViewParams` per view (``P`` of them), drawn for this image's size.
        student_size: QR, the student's side length in pixels.
        teacher_size: DR, the teacher's side length in pixels (>= QR).
        backend: The resize implementation, one of :data:`RESIZE_BACKENDS` (``"pil"`` or the ~3x faster
            ``"torch"``; the same filter, within one grey level of each other).
        fused: Render the DR view with the fused colour matrix and the QR view from it (``--fused-views``).

    Returns:
        ``(student, teacher)``: uint8 tensors ``(P, 3, QR, QR)`` and ``(P, 3, DR, DR)``.

    Raises:
        ValueError: On bad sizes, no views, a crop box outside the image or an unknown backend.
        TypeError: If ``img`` is not a PIL image.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"img must be a PIL.Image.Image, got {type(img).__name__}; decode it with load_image.")
    _check_sizes(student_size, teacher_size)
    _check_backend(backend)
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {type(fused).__name__}.")
    if len(params) == 0:
        raise ValueError("params is empty: pass at least one ViewParams (one per coupled view).")
    num_views = len(params)
    teacher = np.empty((num_views, teacher_size, teacher_size, 3), dtype=np.uint8)
    student = np.empty((num_views, student_size, student_size, 3), dtype=np.uint8)
    _render_into(img, params, student, teacher, range(num_views), backend, fused)
    return _to_chw(student), _to_chw(teacher)


def _view_seed(seed: int, epoch: int, index: int) -> int:
    # SeedSequence hashes the triple so that neighbouring (seed, epoch, index) give unrelated streams.
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


@dataclass(frozen=True)
class PartnerDraws:
    """The reference-mixup draws of one item (``partners=True``), one entry per view.

    Attributes:
        view_seeds: Seed of each view: it seeds the view's :func:`sample_view_params` on the image's size,
            and the partner view's on the partner's size.
        partners: Index (into the dataset) of each view's partner image; uniform over the whole dataset,
            so it may be the item itself.
        lam: Mixing weights ``lam ~ Beta(alpha, alpha)``, float32 values (as the item's ``(P,)`` tensor).
    """

    view_seeds: tuple[int, ...]
    partners: tuple[int, ...]
    lam: tuple[float, ...]


def _view_generator(view_seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(view_seed)


def _teacher_seed(view_seed: int) -> int:
    """The seed of the teacher's own draws for a view (``coupled=False``), unrelated to ``view_seed``'s stream."""
    state = np.random.SeedSequence([view_seed, 1]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


class CoupledViewDataset(torch.utils.data.Dataset):
    """Images -> ``pos_num`` coupled views at the student and teacher resolutions.

    Every image is decoded once per item. The randomness of item ``i`` comes from a generator seeded with
    ``(seed, epoch, i)`` only, so the views are reproducible and do not depend on the number of DataLoader
    workers or on the order in which items are fetched. Call :meth:`set_epoch` before creating each
    epoch's DataLoader iterator (with ``persistent_workers=True`` the workers keep the old epoch).

    With ``partners=True`` the item also carries the reference's mixup partners (module docstring): per
    view, a seed, a partner image index uniform over the dataset and ``lam ~ Beta(alpha, alpha)``
    (:meth:`partner_draws`); the view is :func:`sample_view_params` of a generator seeded with the view's
    seed on the image's size, the partner view the same on the partner's size. Each distinct partner is
    decoded once per item (and not at all when it is the item itself: its partner view is then the view).
    Mix with :func:`mix_partner_views`.

    Args:
        paths: Image files.
        student_size: QR in pixels.
        teacher_size: DR in pixels (>= QR).
        pos_num: ``P``, the number of coupled views per image.
        seed: Non-negative base seed.
        partners: Return the reference's mixup partners with each item (see above).
        alpha: The Beta distribution's parameter for ``lam`` (``partners=True`` only).
        loader: Decodes a file to an RGB ``PIL.Image`` (default :func:`raml.data.images.load_image`).
        backend: Resize implementation (:data:`RESIZE_BACKENDS`); default ``"pil"`` without partners,
            ``"torch"`` with partners (faster resizes, within a grey level).
        coupled: ``False`` (the paper's ablation ``--uncoupled-views``): the teacher's view of each view slot
            gets its own crop, flip and jitter draws (without partners: the next ``P`` draws of the item's
            generator; with partners: a seed derived from the view's seed, also for the partner view), so
            the student and teacher views of an image no longer show the same crop. The student's views
            and every other draw are those of the coupled views.
        fused: Render with the fused approximation (``--fused-views``, module docstring) instead of the
            reference's per-resolution rendering.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        student_size: int,
        teacher_size: int,
        pos_num: int,
        seed: int,
        *,
        partners: bool = False,
        alpha: float = 0.2,
        loader: Callable[[str | Path], Image.Image] = load_image,
        backend: str | None = None,
        coupled: bool = True,
        fused: bool = False,
    ) -> None:
        if isinstance(paths, (str, Path)):
            raise TypeError("paths must be a sequence of image files, got a single path; wrap it in a list.")
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("paths is empty: CoupledViewDataset needs at least one image file.")
        _check_size("student_size", student_size)
        _check_size("teacher_size", teacher_size)
        if student_size > teacher_size:
            raise ValueError(
                f"student_size ({student_size}) must not exceed teacher_size ({teacher_size}); "
                "pass --image-size QR smaller than --teacher-image-size DR."
            )
        if isinstance(pos_num, bool) or not isinstance(pos_num, (int, np.integer)) or pos_num < 1:
            raise ValueError(f"pos_num must be a positive integer (views per image), got {pos_num!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        if not isinstance(partners, bool):
            raise TypeError(f"partners must be a bool, got {type(partners).__name__}.")
        if not isinstance(coupled, bool):
            raise TypeError(f"coupled must be a bool, got {type(coupled).__name__}.")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}.")
        _check_alpha(alpha)
        backend = ("torch" if partners else "pil") if backend is None else backend
        _check_backend(backend)
        self.student_size = int(student_size)
        self.teacher_size = int(teacher_size)
        self.pos_num = int(pos_num)
        self.seed = int(seed)
        self.partners = partners
        self.coupled = coupled
        self.fused = fused
        self.alpha = float(alpha)
        self.backend = backend
        self.epoch = 0
        self.loader = loader
        self._pool: BufferPool | None = None  # the main process's batch buffers (batch()), made on first use

    def __getstate__(self) -> dict:
        # a DataLoader worker gets no pool (its batches go to shared memory); the pool is this process's
        state = self.__dict__.copy()
        state["_pool"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose views :meth:`__getitem__` returns (reseeds every item)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}.")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} images.")
        return int(index) % len(self)

    def generator_for(self, index: int) -> torch.Generator:
        """The generator that drives item ``index`` in the current epoch."""
        return torch.Generator().manual_seed(_view_seed(self.seed, self.epoch, index))

    def partner_draws(self, index: int) -> PartnerDraws:
        """The view seeds, partner indices and weights of item ``index`` in this epoch (``partners=True``).

        Drawn from :meth:`generator_for`: ``P`` view seeds, ``P`` partner indices uniform over the dataset,
        then one seed for a numpy generator that draws the ``P`` weights from ``Beta(alpha, alpha)`` (torch
        has no seeded Beta sampler).
        """
        index = self._check_index(index)
        generator = self.generator_for(index)
        view_seeds = torch.randint(0, 2**62, (self.pos_num,), generator=generator).tolist()
        partners = torch.randint(len(self), (self.pos_num,), generator=generator).tolist()
        beta_rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        lam = beta_rng.beta(self.alpha, self.alpha, size=self.pos_num).astype(np.float32).tolist()
        return PartnerDraws(view_seeds=tuple(view_seeds), partners=tuple(partners), lam=tuple(lam))

    def _item_size(self, item: int | tuple[int, int]) -> tuple[int, int]:
        index, student_size = item if isinstance(item, tuple) else (item, self.student_size)
        index = self._check_index(index)
        if student_size != self.student_size:
            _check_sizes(student_size, self.teacher_size)
        return index, int(student_size)

    def __getitem__(self, item: int | tuple[int, int] | list) -> tuple[Tensor, ...] | tuple[Tensor, Tensor, int]:
        """Item ``i``, or ``(i, size)``: the student views rendered at ``size`` instead of ``student_size``
        (several query sizes, :mod:`raml.data.sizes`); the random draws do not depend on the size.

        A list of items is a whole batch (:meth:`batch`), rendered in place: give the ``DataLoader`` the
        batches as its ``sampler`` with ``batch_size=None`` (:func:`batch_loader_arguments`).
        """
        if isinstance(item, list):
            return self.batch(item)
        index, student_size = self._item_size(item)
        outputs = self._empty_outputs(1, student_size, lambda shape: np.empty(shape, dtype=np.uint8))
        lam = self._render_item(index, *(array[0] for array in outputs))
        views = tuple(_to_chw(array[0]) for array in outputs)
        if self.partners:
            return (*views, torch.tensor(lam, dtype=torch.float32), index)
        return (*views, index)

    def batch(self, items: Sequence[int | tuple[int, int]]) -> list:
        """The items ``items`` collated, rendered straight into the batch (no per-item arrays, no stacking).

        Equal, bit for bit and in layout (channels-last memory), to the ``DataLoader``'s default collation of
        ``[self[i] for i in items]``: ``[student (B, P, 3, S, S), teacher (B, P, 3, DR, DR), indices (B,)]``,
        with partners ``[student, teacher, partner_student, partner_teacher, lam (B, P), indices]``.

        Who owns the memory: the returned tensors. In a ``DataLoader`` worker they are new shared memory (as the
        default collation allocates them: the batch reaches the main process without a copy). In the main
        process they come from the dataset's :class:`~raml.data.buffers.BufferPool`: memory of an earlier
        batch is reused only once every tensor of that batch (and every view of one) has been freed, so a
        batch the caller still holds is never overwritten.

        Raises:
            ValueError: On no items, or items asking for different student sizes.
        """
        if len(items) == 0:
            raise ValueError("items is empty: a batch needs at least one item.")
        resolved = [self._item_size(item) for item in items]
        sizes = {size for _, size in resolved}
        if len(sizes) != 1:
            raise ValueError(f"The items of one batch must share one student size, got sizes {sorted(sizes)}.")
        if torch.utils.data.get_worker_info() is not None:
            allocate = _shared_uint8
        else:
            if self._pool is None:
                # up to 4 arrays of a size per batch (student size = teacher size), 2 batches alive
                self._pool = BufferPool(capacity=8)
            pool = self._pool

            def allocate(shape: tuple[int, ...]) -> Tensor:
                return pool.empty(shape, torch.uint8)

        outputs = self._empty_outputs(len(resolved), sizes.pop(), lambda shape: allocate(shape).numpy())
        lams = [self._render_item(index, *(array[b] for array in outputs)) for b, (index, _) in enumerate(resolved)]
        batch: list = [torch.from_numpy(array).permute(0, 1, 4, 2, 3) for array in outputs]
        if self.partners:
            batch.append(torch.tensor(lams, dtype=torch.float32))
        batch.append(torch.tensor([index for index, _ in resolved]))
        return batch

    def _empty_outputs(
        self, batch: int, student_size: int, allocate: Callable[[tuple[int, ...]], np.ndarray]
    ) -> list[np.ndarray]:
        """``(batch, P, S, S, 3)`` uint8 arrays for the student and teacher views (and the partner views)."""
        num, big = self.pos_num, self.teacher_size
        shapes = [(batch, num, student_size, student_size, 3), (batch, num, big, big, 3)]
        return [allocate(shape) for shape in (shapes * 2 if self.partners else shapes)]

    def _render_item(self, index: int, *outputs: np.ndarray) -> tuple[float, ...] | None:
        """Render item ``index`` into ``(P, S, S, 3)`` arrays (student, teacher, and with partners the partner
        views); return the mixing weights (partners) or None."""
        if self.partners:
            return self._render_item_with_partners(index, *outputs)
        student, teacher = outputs
        img = self.loader(self.paths[index])
        generator = self.generator_for(index)
        params = [sample_view_params(img.width, img.height, generator) for _ in range(self.pos_num)]
        teacher_params = None
        if not self.coupled:  # --uncoupled-views: the teacher's views from the next draws of the same generator
            teacher_params = [sample_view_params(img.width, img.height, generator) for _ in range(self.pos_num)]
        self._render_views(img, params, teacher_params, student, teacher, range(self.pos_num))
        return None

    def _render_views(
        self,
        img: Image.Image,
        params: Sequence[ViewParams],
        teacher_params: Sequence[ViewParams] | None,
        student: np.ndarray,
        teacher: np.ndarray,
        slots: Sequence[int],
    ) -> None:
        """Render ``params[k]`` into ``student[slots[k]]`` and ``teacher[slots[k]]``; uncoupled (``teacher_params``
        given): the student's views from ``params``, the teacher's from ``teacher_params``."""
        if teacher_params is None:
            _render_into(img, params, student, teacher, slots, self.backend, self.fused)
            return
        # each side from its own draws; the fused renderer writes the student's DR view into a scratch array
        scratch = np.empty_like(teacher) if self.fused else teacher
        _render_into(img, params, student, scratch, slots, self.backend, self.fused, write=(True, False))
        _render_into(img, teacher_params, student, teacher, slots, self.backend, self.fused, write=(False, True))

    def _render_seeded(
        self, img: Image.Image, seeds: Sequence[int], student: np.ndarray, teacher: np.ndarray, slots: Sequence[int]
    ) -> None:
        """Render the views drawn from ``seeds`` (one per slot) into ``student``/``teacher`` (partner mode);
        uncoupled: the teacher's from seeds derived from them."""
        params = [sample_view_params(img.width, img.height, _view_generator(s)) for s in seeds]
        teacher_params = None
        if not self.coupled:
            teacher_params = [
                sample_view_params(img.width, img.height, _view_generator(_teacher_seed(s))) for s in seeds
            ]
        self._render_views(img, params, teacher_params, student, teacher, slots)

    def _render_item_with_partners(
        self,
        index: int,
        student: np.ndarray,
        teacher: np.ndarray,
        partner_student: np.ndarray,
        partner_teacher: np.ndarray,
    ) -> tuple[float, ...]:
        draws = self.partner_draws(index)
        img = self.loader(self.paths[index])
        self._render_seeded(img, draws.view_seeds, student, teacher, range(self.pos_num))
        # Views grouped by partner image: each distinct partner is decoded once for this item.
        slots_of: dict[int, list[int]] = {}
        for slot, partner in enumerate(draws.partners):
            slots_of.setdefault(partner, []).append(slot)
        for partner, slots in slots_of.items():
            if partner == index:
                # Same seed and same size: the partner view is the view itself (mixing leaves it as is).
                partner_student[slots], partner_teacher[slots] = student[slots], teacher[slots]
                continue
            partner_img = self.loader(self.paths[partner])
            seeds = [draws.view_seeds[slot] for slot in slots]
            self._render_seeded(partner_img, seeds, partner_student, partner_teacher, slots)
        return draws.lam


def batch_loader_arguments(batches: Sequence[Sequence[int | tuple[int, int]]]) -> dict:
    """``DataLoader`` keyword arguments that make each batch one :meth:`CoupledViewDataset.batch` call.

    ``DataLoader(dataset, **batch_loader_arguments(batches), num_workers=...)`` yields, per list of items,
    the batch the default ``batch_sampler=batches`` would (the same tensors, bit for bit), rendered in place.
    """
    return {"sampler": [list(batch) for batch in batches], "batch_size": None}


def _shared_uint8(shape: tuple[int, ...]) -> Tensor:
    """A uint8 tensor in shared memory, as the default collation allocates a worker's batch."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number (Beta(alpha, alpha)), got {alpha!r}.")


def mix_partner_views(
    student: Tensor,
    teacher: Tensor,
    partner_student: Tensor,
    partner_teacher: Tensor,
    lam: Tensor,
    *,
    pool: BufferPool | None = None,
) -> tuple[Tensor, Tensor]:
    """The reference's mixup: ``lam * view + (1 - lam) * partner``, with the same ``lam`` at both resolutions.

    Un-normalised pixels are mixed (normalisation is affine, so mixing before or after it is the same). On
    the CPU each view is one fused ``lerp`` written straight into the output (uint8 inputs are converted
    view by view, never as a whole batch); on other devices one batched ``lerp``.

    Args:
        student: ``(B, P, 3, QR, QR)`` student views, uint8 (as :class:`CoupledViewDataset` gives them) or
            floating point.
        teacher: ``(B, P, 3, DR, DR)`` teacher views, the same dtype; on any device (the teacher's, ``-g 0,1``).
        partner_student: The partner views at QR, the shape, dtype and device of ``student``.
        partner_teacher: The partner views at DR, the shape, dtype and device of ``teacher``.
        lam: ``(B, P)`` floating-point weights in [0, 1] (on the CPU or the views' device).
        pool: CPU outputs only: take them from this :class:`~raml.data.buffers.BufferPool` (memory recycled
            once the previous outputs are freed; no page faults of a fresh 150 MB batch per call) instead of
            fresh memory. Ignored on other devices.

    Returns:
        The mixed ``(student, teacher)``: new tensors of the input shapes; float32 for uint8 inputs (pixel
        values in [0, 255], not rounded), the input dtype for floating-point inputs.

    Raises:
        TypeError: On non-tensors or dtypes other than uint8 / floating point, or mismatched dtypes.
        ValueError: On mismatched shapes or devices, or weights outside [0, 1].
    """
    views = {
        "student": student,
        "teacher": teacher,
        "partner_student": partner_student,
        "partner_teacher": partner_teacher,
    }
    for name, tensor in views.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, P, 3, S, S), got {type(tensor).__name__}.")
        if tensor.dim() != 5:
            raise ValueError(f"{name} must have shape (B, P, C, S, S), got shape {tuple(tensor.shape)}.")
        if not (tensor.is_floating_point() or tensor.dtype == torch.uint8):
            raise TypeError(f"{name} must be a floating-point or uint8 tensor of pixels, got {tensor.dtype}.")
        if tensor.dtype != student.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but student has {student.dtype}; use one dtype.")
        # each resolution on its network's device: the teacher's views may live on another GPU (-g 0,1)
        view = teacher if name.endswith("teacher") else student
        if tensor.device != view.device:
            raise ValueError(f"{name} is on {tensor.device} but its view is on {view.device}; move the pair together.")
    for name, (view, partner) in (("student", (student, partner_student)), ("teacher", (teacher, partner_teacher))):
        if view.shape != partner.shape:
            raise ValueError(
                f"partner_{name} {tuple(partner.shape)} must have the shape of {name} {tuple(view.shape)}."
            )
    if student.shape[:3] != teacher.shape[:3]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must agree on (B, P, C): "
            "they are the same views at two resolutions."
        )
    if not isinstance(lam, Tensor) or not lam.is_floating_point():
        raise TypeError(f"lam must be a floating-point torch.Tensor (B, P), got {getattr(lam, 'dtype', type(lam))}.")
    if tuple(lam.shape) != tuple(student.shape[:2]):
        raise ValueError(f"lam must have shape (B, P) = {tuple(student.shape[:2])}, got {tuple(lam.shape)}.")
    if lam.numel() and not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError("lam must lie in [0, 1] (a Beta draw); got values outside it or NaN.")
    out_dtype = student.dtype if student.is_floating_point() else torch.float32
    mixed = []
    for view, partner in ((student, partner_student), (teacher, partner_teacher)):
        mix = _lerp_per_view if view.device.type == "cpu" else _lerp_batched
        mixed.append(mix(view, partner, lam, out_dtype, pool))
    return mixed[0], mixed[1]


def _empty_output(like: Tensor, dtype: torch.dtype, pool: BufferPool | None) -> Tensor:
    """An uninitialised tensor of ``like``'s shape and memory layout in ``dtype``: from ``pool`` for a CPU tensor
    when a pool is given (recycled memory), else fresh."""
    if pool is not None and like.device.type == "cpu":
        return pool.empty_like(like, dtype)
    return torch.empty_like(like, dtype=dtype, memory_format=torch.preserve_format)


def _lerp_per_view(
    view: Tensor, partner: Tensor, lam: Tensor, out_dtype: torch.dtype, pool: BufferPool | None = None
) -> Tensor:
    """CPU: one fused ``lerp`` per view into the output (uint8 converted view by view, never as a batch).

    The output has the views' memory layout; from ``pool`` if given (recycled memory: a big fresh batch costs
    more in page faults than in arithmetic, :mod:`raml.data.buffers`), else fresh.
    """
    mixed = _empty_output(view, out_dtype, pool)
    weights = lam.tolist()
    for b in range(view.shape[0]):
        for i in range(view.shape[1]):
            out = mixed[b, i]
            if view.is_floating_point():
                torch.lerp(partner[b, i], view[b, i], weights[b][i], out=out)
            elif out_dtype == torch.float32 and _same_dense_layout(view[b, i], partner[b, i], out):
                # one compiled pass: both uint8 views read once, the float32 result written once (3x fewer
                # passes than convert + convert + lerp; the same formula as torch.lerp)
                dims = _memory_order(out)
                lerp_uint8_into(
                    partner[b, i].permute(dims).numpy(), view[b, i].permute(dims).numpy(), weights[b][i],
                    out.permute(dims).numpy(),
                )  # fmt: skip
            else:
                out.copy_(partner[b, i])  # uint8 -> float straight into the output: no temporary
                out.lerp_(view[b, i].to(out_dtype), weights[b][i])
    return mixed


def _memory_order(tensor: Tensor) -> list[int]:
    """Dimensions from the largest stride to the smallest: permuted so, a dense tensor is C-contiguous."""
    return sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))


def _same_dense_layout(*tensors: Tensor) -> bool:
    """Whether the tensors have one shape and one stride order, each dense (C-contiguous once permuted)."""
    first = tensors[0]
    dims = _memory_order(first)
    return all(
        t.shape == first.shape and t.stride() == first.stride() and t.permute(dims).is_contiguous() for t in tensors
    )


def _lerp_batched(
    view: Tensor, partner: Tensor, lam: Tensor, out_dtype: torch.dtype, pool: BufferPool | None = None
) -> Tensor:
    """Accelerators: one batched kernel; ``lerp(start, end, w) = start + w * (end - start)``."""
    weight = lam.to(view.device, out_dtype).view(*lam.shape, 1, 1, 1)
    return torch.lerp(partner.to(out_dtype), view.to(out_dtype), weight)


def _derangement(size: int, generator: torch.Generator) -> Tensor:
    """A uniformly random permutation without fixed points (rejection sampling, ~e tries); ``size >= 2``."""
    identity = torch.arange(size)
    while True:
        perm = torch.randperm(size, generator=generator)
        if not bool((perm == identity).any()):
            return perm


def mixup_views(
    student: Tensor,
    teacher: Tensor,
    generator: torch.Generator,
    alpha: float = 0.2,
    *,
    pool: BufferPool | None = None,
) -> tuple[Tensor, Tensor]:
    """Mix every view with a view of another image, identically at both resolutions.

    View ``(b, i)`` becomes ``lam * x[b, i] + (1 - lam) * x[b', i']`` with ``lam ~ Beta(alpha, alpha)``
    drawn per view, ``b'`` from a random permutation of the batch without fixed points (one per view
    slot ``i``; so ``b' != b`` when ``B > 1``) and ``i'`` uniform over the views. The same ``lam``, ``b'``
    and ``i'`` are used for the student and the teacher input. With ``B == 1`` the partner is another
    view of the same image (the view itself when ``P == 1``, i.e. no change). Mix un-normalised pixels:
    normalisation is affine, so mixing before or after it is the same.

    Random numbers are drawn on the CPU from ``generator`` and then moved, so the result is the same on
    any device.

    Args:
        student: ``(B, P, 3, QR, QR)`` floating-point student views, or the uint8 views straight from
            :class:`CoupledViewDataset` (then the conversion to float32 is fused into the mix, one view
            at a time, which saves a pass over the whole batch).
        teacher: ``(B, P, 3, DR, DR)`` teacher views of the same dtype (same ``B`` and ``P``; on the student's
            device or the teacher's own).
        generator: A CPU ``torch.Generator``.
        alpha: Beta distribution parameter (> 0).
        pool: CPU outputs only: take them from this :class:`~raml.data.buffers.BufferPool` (recycled memory,
            as :func:`mix_partner_views`) instead of fresh memory.

    Returns:
        The mixed ``(student, teacher)``, new tensors of the input shapes; float inputs keep their dtype,
        uint8 inputs give float32 (un-rounded pixel values in [0, 255]).

    Raises:
        ValueError: On inconsistent shapes or a bad ``alpha``.
        TypeError: On inputs that are neither floating-point nor uint8.
    """
    for name, tensor in (("student", student), ("teacher", teacher)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, P, 3, S, S), got {type(tensor).__name__}.")
        if tensor.dim() != 5:
            raise ValueError(f"{name} must have shape (B, P, C, S, S), got shape {tuple(tensor.shape)}.")
        if not (tensor.is_floating_point() or tensor.dtype == torch.uint8):
            raise TypeError(
                f"{name} must be a floating-point or uint8 tensor of pixels, got {tensor.dtype}; convert it "
                "with .float() before mixing."
            )
    if student.shape[:3] != teacher.shape[:3]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must agree on (B, P, C): "
            "they are the same views at two resolutions."
        )
    if student.dtype != teacher.dtype:
        raise TypeError(f"student ({student.dtype}) and teacher ({teacher.dtype}) must have the same dtype.")
    _check_alpha(alpha)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError("generator must be a CPU torch.Generator (the draws are made on the CPU, then moved).")
    batch, views = student.shape[:2]
    if batch == 0:
        return student.clone(), teacher.clone()

    if batch > 1:
        partner_image = torch.stack([_derangement(batch, generator) for _ in range(views)], dim=1)  # (B, P)
        partner_view = torch.randint(views, (batch, views), generator=generator)
    else:
        partner_image = torch.zeros(1, views, dtype=torch.long)
        if views > 1:
            # Another view of the same image: shift by 1..P-1 so the view never pairs with itself.
            shift = torch.randint(1, views, (1, views), generator=generator)
            partner_view = (torch.arange(views).unsqueeze(0) + shift) % views
        else:
            partner_view = torch.zeros(1, 1, dtype=torch.long)
    # Beta(a, a) from two Gamma(a) draws, with numpy seeded from the torch generator (torch's samplers
    # take no generator).
    numpy_rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    lam = torch.from_numpy(numpy_rng.beta(alpha, alpha, size=(batch, views)))

    # One fused pass per view (out = lam * x + (1 - lam) * partner) instead of a batched gather followed
    # by a blend: on the CPU this is memory-bound, and it halves the traffic.
    lam_list = lam.tolist()
    pairs = [(b, i, int(partner_image[b, i]), int(partner_view[b, i])) for b in range(batch) for i in range(views)]
    outputs = []
    for tensor in (student, teacher):
        out_dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        mixed = _empty_output(tensor, out_dtype, pool)
        for b, i, pb, pi in pairs:
            end, start = tensor[b, i].to(out_dtype), tensor[pb, pi].to(out_dtype)  # no copy when float
            torch.lerp(start, end, lam_list[b][i], out=mixed[b, i])
        outputs.append(mixed)
    return outputs[0], outputs[1]
