"""A built-in synthetic fine-grained dataset in the CUB-200-2011 on-disk layout, where resolution matters.

Every image shows one object on a cluttered background. Classes are grouped in *families*: the classes of a
family share the coarse appearance (outline, colour scheme, a coloured cap and an eye spot) and differ only in a
fine two-tone surface pattern (stripes, checks, dots, rings, ...). All patterns of a family have the same mean
colour, and the "plain" sibling is painted with exactly that mean, so once the image is shrunk so far that the
pattern period falls near or below the Nyquist limit, siblings become (nearly) indistinguishable, while families
remain easy to tell apart. Intra-class variation: rotation, scale, aspect, position, pattern phase and period,
colour and illumination jitter, background colour, clutter and pixel noise.

The output folder is what the project's CUB loader reads: ``images.txt``, ``classes.txt``,
``image_class_labels.txt``, ``train_test_split.txt`` and JPEG images under
``images/<NNN.Class_Name>/``. The loader uses the first half of the classes for training and the second half for
testing, so families never straddle the two halves: test classes belong to families never seen in training,
but their fine patterns come from the same vocabulary.

Contract: ``render_image(spec, size, rng)`` returns a ``(size, size, 3)`` ``uint8`` array; everything is drawn
with numpy from a seeded ``numpy.random.Generator``, so one seed gives byte-identical files.
"""

from __future__ import annotations

import colorsys
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from raml.locking import DirectoryLock
from raml.utils import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "PATTERNS",
    "SHAPES",
    "SynthClass",
    "generate_synthetic_dataset",
    "make_class_specs",
    "render_image",
]

#: Fine surface patterns; every one of them has a mean coverage of about one half, "plain" is the mean colour.
#: All are unchanged by a horizontal flip, so flip augmentation never turns one class into another.
PATTERNS: tuple[str, ...] = ("plain", "hstripes", "vstripes", "checker", "dots", "rings", "diamonds", "zigzag")

#: Outline families as Fourier perturbations ``(k, amplitude)`` of a unit circle in polar coordinates.
SHAPES: dict[str, tuple[tuple[int, float], ...]] = {
    "Oval": ((2, 0.0),),
    "Egg": ((1, 0.12), (2, 0.05)),
    "Trilobe": ((3, 0.16),),
    "Clover": ((4, 0.14),),
    "Star": ((5, 0.22),),
    "Bean": ((2, 0.16), (3, 0.06)),
    "Hexa": ((6, 0.08),),
    "Drop": ((1, 0.22), (3, 0.05)),
}

_HUE_NAMES = ("Red", "Orange", "Yellow", "Lime", "Green", "Teal", "Cyan", "Azure", "Blue", "Violet", "Purple", "Rose")

_SUPERSAMPLE = 2  # render at 2x and box-filter down: anti-aliased edges and patterns


@dataclass(frozen=True)
class SynthClass:
    """Everything that defines one synthetic class (one family member).

    Attributes:
        class_id: 1-based class number (the number before the dot of the folder name).
        name: class name without the number, e.g. ``Synth_F03_Star_Checker``.
        family: 0-based family index; the classes of a family differ only in ``pattern``.
        shape: key of ``SHAPES``.
        harmonics: outline as ``(k, amplitude, phase)`` triples of the polar radius function.
        aspect: length / width of the object.
        body_rgb: one of the two pattern colours, values in [0, 1].
        pattern_rgb: the other pattern colour.
        cap_rgb: colour of the solid cap at the front of the object.
        cap_start: the cap covers object coordinates ``u > cap_start`` (unit radius object).
        pattern: key of ``PATTERNS``.
        period: pattern period in pixels of a 128 px image (scaled with the image size).
    """

    class_id: int
    name: str
    family: int
    shape: str
    harmonics: tuple[tuple[int, float, float], ...]
    aspect: float
    body_rgb: tuple[float, float, float]
    pattern_rgb: tuple[float, float, float]
    cap_rgb: tuple[float, float, float]
    cap_start: float
    pattern: str
    period: float

    @property
    def folder(self) -> str:
        """The CUB-style class folder name, ``NNN.Name``."""
        return f"{self.class_id:03d}.{self.name}"


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (float(r), float(g), float(b))


def _family_sizes(n: int, max_siblings: int) -> list[int]:
    """Split ``n`` consecutive classes into near-equal families of at most ``max_siblings`` classes."""
    n_fam = math.ceil(n / max_siblings)
    base, extra = divmod(n, n_fam)
    return [base + (1 if i < extra else 0) for i in range(n_fam)]


def _half_family_sizes(half: int, max_siblings: int) -> list[int]:
    """Family sizes for one half of the classes.

    The loader's default validation split (ratio 0.5) takes the last ``half - round(half / 2)`` training
    classes; families are cut at that boundary too (when both parts keep at least 2 classes), so validation
    classes also come from families unseen in training.
    """
    first = round(half * 0.5)
    if first >= 2 and half - first >= 2:
        return _family_sizes(first, max_siblings) + _family_sizes(half - first, max_siblings)
    return _family_sizes(half, max_siblings)


def make_class_specs(
    num_classes: int, seed: int = 0, max_siblings: int = 4, pattern_period: tuple[float, float] = (7.0, 9.0)
) -> list[SynthClass]:
    """Draw the class definitions: families of siblings that share everything but the fine pattern.

    Args:
        num_classes: number of classes, even: the first half and the second half are built from disjoint
            families, so the loader's train/test split by class never cuts a family in two (nor, where each
            quarter has at least 2 classes, its default train/val split of the first half).
        seed: seed of the class definitions (and, in ``generate_synthetic_dataset``, of the images).
        max_siblings: largest number of classes per family (at most ``len(PATTERNS)``).

    Returns:
        The classes in order, ``class_id`` 1..num_classes.

    Raises:
        ValueError: if ``num_classes`` is not a positive even number or ``max_siblings`` is out of range.
    """
    if num_classes < 2 or num_classes % 2:
        raise ValueError(
            f"num_classes must be a positive even number (the loader splits classes in halves), got {num_classes}"
        )
    if not 1 <= max_siblings <= len(PATTERNS):
        raise ValueError(f"max_siblings must be in [1, {len(PATTERNS)}], got {max_siblings}")
    rng = np.random.default_rng([seed, 1])
    half = num_classes // 2
    sizes = _half_family_sizes(half, max_siblings) * 2
    shape_names = list(SHAPES)
    specs: list[SynthClass] = []
    # Cycle shapes and spread hues so that neighbouring families are clearly different at the coarse level.
    shape_order = rng.permutation(len(shape_names))
    hue_offset = float(rng.random())
    golden = 0.6180339887
    for fam, n_sib in enumerate(sizes):
        shape = shape_names[int(shape_order[fam % len(shape_names)])]
        harmonics = tuple(
            (k, a * float(rng.uniform(0.8, 1.2)), float(rng.uniform(0, 2 * math.pi))) for k, a in SHAPES[shape]
        )
        # a small random harmonic makes every family's outline unique even when the shape name repeats
        harmonics += ((int(rng.integers(2, 5)), float(rng.uniform(0.02, 0.05)), float(rng.uniform(0, 2 * math.pi))),)
        hue = (hue_offset + fam * golden) % 1.0
        sat = float(rng.uniform(0.45, 0.85))
        val = float(rng.uniform(0.55, 0.8))
        # the two pattern colours differ mostly in luminance (JPEG keeps luminance detail best)
        delta = float(rng.uniform(0.38, 0.46))
        if rng.random() < 0.5:
            body, pat = _hsv(hue, sat, val + delta / 2), _hsv(hue, sat * 0.9, val - delta / 2)
        else:
            body, pat = _hsv(hue, sat * 0.9, val - delta / 2), _hsv(hue, sat, val + delta / 2)
        cap = _hsv(hue + float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.5, 0.9)), float(rng.uniform(0.35, 0.9)))
        cap_start = float(rng.uniform(0.45, 0.65))
        aspect = float(rng.uniform(1.15, 1.6))
        period = float(rng.uniform(*pattern_period))
        patterns = [PATTERNS[int(i)] for i in rng.permutation(len(PATTERNS))[:n_sib]]
        hue_name = _HUE_NAMES[int(hue * len(_HUE_NAMES)) % len(_HUE_NAMES)]
        for pattern in patterns:
            class_id = len(specs) + 1
            specs.append(
                SynthClass(
                    class_id=class_id,
                    name=f"Synth_F{fam + 1:02d}_{hue_name}_{shape}_{pattern.capitalize()}",
                    family=fam,
                    shape=shape,
                    harmonics=harmonics,
                    aspect=aspect,
                    body_rgb=body,
                    pattern_rgb=pat,
                    cap_rgb=cap,
                    cap_start=cap_start,
                    pattern=pattern,
                    period=period,
                )
            )
    return specs


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Binary pattern (float 0/1) in object-aligned pixel coordinates ``u`` (along the body) and ``v``."""
    w = 2 * math.pi / period
    if pattern == "plain":
        return np.full(u.shape, 0.5, dtype=np.float32)
    if pattern == "hstripes":
        m = np.sin(w * v) > 0
    elif pattern == "vstripes":
        m = np.sin(w * u) > 0
    elif pattern == "checker":
        m = np.sin(w * u) * np.sin(w * v) > 0
    elif pattern == "dots":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        m = du * du + dv * dv < (0.4 * period) ** 2
    elif pattern == "rings":
        m = np.sin(w * np.sqrt(u * u + v * v)) > 0
    elif pattern == "diamonds":
        w2 = w / math.sqrt(2)
        m = np.sin(w2 * (u + v)) * np.sin(w2 * (u - v)) > 0
    elif pattern == "zigzag":
        tri = np.abs(np.mod(u / period, 1.0) - 0.5) * period  # triangle wave, amplitude period / 2
        m = np.sin(w * (v + tri)) > 0
    else:
        raise ValueError(f"unknown pattern {pattern!r}; valid: {', '.join(PATTERNS)}")
    return m.astype(np.float32)


def _blend(canvas: np.ndarray, mask: np.ndarray, rgb: np.ndarray | tuple[float, float, float], alpha: float) -> None:
    """Alpha-blend a flat colour into ``canvas`` (H, W, 3) where the boolean ``mask`` (H, W) is set, in place."""
    a = mask[..., None] * np.float32(alpha)
    canvas += a * (np.asarray(rgb, dtype=np.float32) - canvas)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted background (size, size, 3) with a few blobs and strokes of clutter (coarse, unrelated to classes)."""
    base = np.asarray(_hsv(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.85)), dtype=np.float32)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = base
    coords = np.arange(size, dtype=np.float32) + 0.5
    for _ in range(int(rng.integers(3, 8))):
        rgb = _hsv(rng.random(), rng.uniform(0.05, 0.5), rng.uniform(0.25, 0.95))
        cx, cy = rng.uniform(0, size, 2)
        t = rng.uniform(0, math.pi)
        is_blob = rng.random() < 0.6
        if is_blob:  # ellipse
            ra, rb = rng.uniform(0.06, 0.25, 2) * size
            reach = max(ra, rb)
        else:  # straight stroke (twig-like), 2-5 % of the image wide
            ra = rng.uniform(0.2, 0.5) * size
            rb = rng.uniform(0.01, 0.025) * size
            reach = ra + rb
        alpha = float(rng.uniform(0.3, 0.7))
        # only evaluate the item's bounding window
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, size)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, size)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = coords[None, x0:x1] - cx
        dy = coords[y0:y1, None] - cy
        along = dx * math.cos(t) + dy * math.sin(t)
        across = -dx * math.sin(t) + dy * math.cos(t)
        inside_blob = (along / ra) ** 2 + (across / rb) ** 2 < 1
        mask = inside_blob if is_blob else (np.abs(along) < ra) & (np.abs(across) < rb)
        _blend(canvas[y0:y1, x0:x1], mask, rgb, alpha)
    return canvas


def _box_down(x: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks of an (H * factor, W * factor, C) array."""
    out = x[0::factor, 0::factor].copy()
    for i in range(factor):
        for j in range(factor):
            if i or j:
                out += x[i::factor, j::factor]
    return out * np.float32(1.0 / (factor * factor))


def render_image(spec: SynthClass, size: int = 128, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render one image of a class.

    Args:
        spec: the class.
        size: side of the square output image in pixels, at least 8.
        rng: source of the intra-class variation; ``None`` renders the canonical template (centred, upright,
            no clutter, no jitter, grey background), useful for measuring class differences.

    Returns:
        ``(size, size, 3)`` ``uint8`` RGB image.

    Raises:
        ValueError: if ``size`` is below 8.
    """
    if size < 8:
        raise ValueError(f"image size must be at least 8 px, got {size}")
    scale_px = size / 128.0  # design units are pixels of a 128 px image
    if rng is None:
        angle, radius_scale, aspect_jit, off = 0.0, 1.0, 1.0, (0.0, 0.0)
        phase_u = phase_v = 0.0
        period_jit, gain, grad, colour_jit, noise = 1.0, 1.0, (0.0, 0.0), (0.0, 0.0, 0.0), 0.0
        background = np.full((size, size, 3), 0.5, dtype=np.float32)
    else:
        background = _background(rng, size)
        angle = float(rng.uniform(-25, 25)) * math.pi / 180
        radius_scale = float(rng.uniform(0.85, 1.15))
        aspect_jit = float(rng.uniform(0.9, 1.1))
        off = (float(rng.uniform(-0.06, 0.06)) * size, float(rng.uniform(-0.06, 0.06)) * size)
        phase_u, phase_v = float(rng.uniform(0, 1)), float(rng.uniform(0, 1))  # in periods
        period_jit = float(rng.uniform(0.92, 1.08))
        gain = float(rng.uniform(0.8, 1.15))
        grad = (float(rng.uniform(-0.2, 0.2)), float(rng.uniform(-0.2, 0.2)))
        colour_jit = (float(rng.uniform(-0.025, 0.025)), float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.06, 0.06)))
        noise = float(rng.uniform(0.005, 0.02))

    # Object geometry. u runs along the body axis (towards the cap), v across it, both in pixels of this image.
    aspect = spec.aspect * aspect_jit
    radius = 0.3 * size * radius_scale  # geometric mean of the half-length and the half-width
    a_len, a_wid = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    r_max = 1.0 + sum(abs(amp) for _, amp, _ in spec.harmonics)
    ss = _SUPERSAMPLE
    # the object's bounding window in output pixels, rendered at ss x ss samples per pixel
    cx, cy = size / 2 + off[0], size / 2 + off[1]
    reach = a_len * r_max + 1
    x0, x1 = max(int(cx - reach), 0), min(int(math.ceil(cx + reach)), size)
    y0, y1 = max(int(cy - reach), 0), min(int(math.ceil(cy + reach)), size)
    xs = x0 + (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss - cx
    ys = y0 + (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss - cy
    ca, sa = math.cos(angle), math.sin(angle)
    u_px = xs[None, :] * ca + ys[:, None] * sa
    v_px = -xs[None, :] * sa + ys[:, None] * ca
    un, vn = u_px / a_len, v_px / a_wid
    rho = np.sqrt(un * un + vn * vn)
    theta = np.arctan2(vn, un)
    r_edge = np.ones_like(theta)
    for k, amp, ph in spec.harmonics:
        r_edge += amp * np.cos(k * theta + ph)
    body = rho < r_edge

    def jitter(rgb: tuple[float, float, float]) -> np.ndarray:
        h, s, v = colorsys.rgb_to_hsv(*rgb)
        return np.asarray(_hsv(h + colour_jit[0], s * (1 + colour_jit[1]), v + colour_jit[2]), dtype=np.float32)

    c_body, c_pat, c_cap = jitter(spec.body_rgb), jitter(spec.pattern_rgb), jitter(spec.cap_rgb)
    period = spec.period * scale_px * period_jit * radius_scale
    pat = _pattern_mask(spec.pattern, u_px + phase_u * period, v_px + phase_v * period, period)
    obj = c_body + pat[..., None] * (c_pat - c_body)
    _blend(obj, un > spec.cap_start, c_cap, 1.0)  # solid cap at the front
    _blend(obj, rho > r_edge - 0.05, (0.1, 0.1, 0.1), 0.7)  # dark rim: a readable silhouette on any background
    eu, ev = (spec.cap_start + 1.0) / 2 * 0.9, 0.25
    eye = (un - eu) ** 2 * (a_len / a_wid) ** 2 + (vn - ev) ** 2 < 0.12**2
    _blend(obj, eye, (0.05, 0.05, 0.05), 1.0)  # eye spot on the cap
    # anti-alias: box-filter the supersampled, alpha-premultiplied object down, then composite
    alpha = body.astype(np.float32)
    premult = _box_down(obj * alpha[..., None], ss)
    cover = _box_down(alpha[..., None], ss)
    img = background
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - cover) + premult
    if rng is not None:
        lin = (np.arange(size, dtype=np.float32) / size - 0.5)[None, :, None]
        col = (np.arange(size, dtype=np.float32) / size - 0.5)[:, None, None]
        img = img * (gain * (1 + grad[0] * lin + grad[1] * col))
        img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def generate_synthetic_dataset(
    out_dir: str | Path,
    num_classes: int = 100,
    images_per_class: int = 24,
    image_size: int = 128,
    seed: int = 0,
    progress: bool = False,
    pattern_period: tuple[float, float] = (7.0, 9.0),
) -> Path:
    """Write the synthetic dataset to ``out_dir`` in the CUB-200-2011 on-disk format.

    Files: ``images.txt`` (``<id> <class-folder>/<file>``, ids 1..N), ``classes.txt``
    (``<class id> <class-folder>``), ``image_class_labels.txt`` (``<image id> <class id>``),
    ``train_test_split.txt`` (``<image id> <1 if the class is in the first half else 0>``) and
    ``images/<NNN.Name>/<Name>_<k>.jpg`` (JPEG, quality 90). The same seed gives byte-identical files.

    Args:
        out_dir: dataset folder, created if missing; existing files of the same names are overwritten.
        num_classes: number of classes, even (the first half is for training, the second for testing).
        images_per_class: images per class, at least 1.
        image_size: side of the square images in pixels, at least 16.
        seed: seed of everything drawn.
        progress: show a tqdm progress bar.

    Returns:
        ``out_dir`` as a ``Path``.

    The folder is locked while it is written (:class:`raml.locking.DirectoryLock`); the temporary files a
    stopped generation left there (``.<name>.<hex>.tmp`` of its images and index files) are removed first.

    Raises:
        ValueError: on an odd or too small ``num_classes``, or too small ``images_per_class``/``image_size``.
        raml.locking.LockHeldError: another generation is writing into ``out_dir``.
    """
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be at least 1, got {images_per_class}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px, got {image_size}")
    if not 0 < pattern_period[0] <= pattern_period[1]:
        raise ValueError(f"pattern_period must be (low, high) with 0 < low <= high, got {pattern_period}")
    specs = make_class_specs(num_classes, seed, pattern_period=pattern_period)
    out = Path(out_dir)
    # one writer at a time (a second is refused at once, naming the first), so that the temporary files a
    # killed run left can be removed without touching those of a run still writing
    with DirectoryLock(out, "raml synthetic dataset generation"):
        _remove_own_temporaries(out)
        _write_dataset(out, specs, num_classes, images_per_class, image_size, seed, progress)
    return out


#: the index files :func:`generate_synthetic_dataset` writes at the top of the dataset folder
_INDEX_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")


def _is_temporary_of(name: str, targets: Callable[[str], bool]) -> bool:
    """Whether ``name`` is an :func:`raml.utils.atomic_path` temporary file (``.<target>.<8 hex>.tmp``) of a
    target for which ``targets(target)`` holds."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    target, _, token = name[1 : -len(".tmp")].rpartition(".")
    return len(token) == 8 and all(c in "0123456789abcdef" for c in token) and targets(target)


def _remove_own_temporaries(out: Path) -> None:
    """Remove the temporary files a killed generation left in ``out`` (a SIGTERM or kill -9 while an image or
    an index file was written): those of the index files, and those of ``.jpg`` images in the class folders
    under ``images/``. Any other file is left alone. Call it holding the folder's lock."""
    stale = [p for p in out.glob(".*.tmp") if _is_temporary_of(p.name, lambda t: t in _INDEX_FILES)]
    stale += [p for p in out.glob("images/*/.*.tmp") if _is_temporary_of(p.name, lambda t: t.endswith(".jpg"))]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("Removed %d temporary files a stopped generation left in %s", len(stale), out)


def _write_dataset(
    out: Path,
    specs: list[SynthClass],
    num_classes: int,
    images_per_class: int,
    image_size: int,
    seed: int,
    progress: bool,
) -> None:
    """The files of :func:`generate_synthetic_dataset` (its arguments), under its lock."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    images_lines: list[str] = []
    label_lines: list[str] = []
    split_lines: list[str] = []
    half = num_classes // 2
    # one pair at a time: a list of every (class, image) pair filled the memory before the first image (huge sizes)
    total = len(specs) * images_per_class
    jobs: Iterable[tuple[SynthClass, int]] = ((spec, k) for spec in specs for k in range(images_per_class))
    iterator = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, total=total, desc="synthetic images", unit="img")
    for image_id, (spec, k) in enumerate(iterator, start=1):
        rng = np.random.default_rng([seed, 2, spec.class_id, k])
        img = render_image(spec, image_size, rng)
        rel = f"{spec.folder}/{spec.name}_{k + 1:04d}.jpg"
        path = out / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, format="JPEG", quality=90, subsampling=0)
        images_lines.append(f"{image_id} {rel}")
        label_lines.append(f"{image_id} {spec.class_id}")
        split_lines.append(f"{image_id} {1 if spec.class_id <= half else 0}")
    atomic_write_text(out / "images.txt", "\n".join(images_lines) + "\n")
    atomic_write_text(out / "classes.txt", "".join(f"{s.class_id} {s.folder}\n" for s in specs))
    atomic_write_text(out / "image_class_labels.txt", "\n".join(label_lines) + "\n")
    atomic_write_text(out / "train_test_split.txt", "\n".join(split_lines) + "\n")
    logger.info(
        "wrote %d synthetic images (%d classes, %d families, %d px) to %s",
        total,
        num_classes,
        len({s.family for s in specs}),
        image_size,
        out,
    )
