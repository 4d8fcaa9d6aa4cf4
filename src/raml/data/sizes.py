"""Several query resolutions for one student: the size list and the per-batch size draw.

- :func:`parse_image_sizes`: ``"24,32,48"``, ``32`` or ``[24, 32, 48]`` -> ``[24, 32, 48]`` (validated; the
  first size is the default one, e.g. where a single size is needed).
- :func:`draw_batch_sizes`: one student size per batch of an epoch. The draws come from a generator of their
  own, seeded from ``(seed, epoch)`` only, so that they take nothing from the generators that draw the
  epoch's order, views and mixup (a single-size run draws nothing and stays bit-identical to a run without
  this module), every process of a multi-process run draws the same size for a global batch, and a resumed
  run draws what an uninterrupted one would. The sizes are balanced: over an epoch each size is drawn
  ``n // k`` or ``n // k + 1`` times for ``n`` batches and ``k`` sizes.
- :class:`SizedImages`: a dataset of ``(index, size)`` items -> ``((3, size, size) float32, index)``, the
  evaluation transform at a per-item size (``ts_reg`` with several sizes; a batch sampler gives every item of
  a batch the same size, so batches stay rectangular).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from raml.data.images import EvalTransform, load_image

logger = logging.getLogger(__name__)

__all__ = ["SizedImages", "draw_batch_sizes", "parse_image_sizes", "size_generator"]

# mixed into the seed so that the size stream is unrelated to every other stream seeded from (seed, epoch)
_SIZE_STREAM = 0x5153  # "QS"


def parse_image_sizes(value: str | int | Sequence[int]) -> list[int]:
    """A list of distinct positive image sides in pixels, in the given order.

    Args:
        value: ``"24,32,48"`` (spaces allowed), one integer, or a sequence of integers.

    Returns:
        The sizes; the first is the default size.

    Raises:
        ValueError: On an empty list, a size that is not a positive integer, or a repeated size.
    """
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not value.strip() or any(not p for p in parts):
            raise ValueError(f"Expected image sizes as comma-separated integers such as '24,32,48', got {value!r}.")
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"Expected image sizes as comma-separated integers such as '24,32,48', got {value!r}."
            ) from None
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        sizes = [int(value)]
    elif isinstance(value, Sequence):
        sizes = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                raise ValueError(f"Image sizes must be integers (pixels), got {item!r} in {list(value)!r}.")
            sizes.append(int(item))
    else:
        raise ValueError(f"Expected image sizes (e.g. '24,32,48' or [24, 32, 48]), got {value!r}.")
    if not sizes:
        raise ValueError("The list of image sizes is empty; give at least one size, e.g. '32' or '24,32,48'.")
    bad = [s for s in sizes if s < 1]
    if bad:
        raise ValueError(f"Image sizes must be positive integer numbers of pixels, got {bad} in {sizes}.")
    repeated = sorted({s for s in sizes if sizes.count(s) > 1})
    if repeated:
        raise ValueError(f"Image sizes must be distinct, got {repeated} more than once in {sizes}.")
    return sizes


def size_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of an epoch's size draws: seeded from ``(seed, epoch)`` and a tag of its own."""
    state = np.random.SeedSequence([int(seed), int(epoch), _SIZE_STREAM]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_batch_sizes(sizes: Sequence[int], num_batches: int, seed: int, epoch: int) -> list[int]:
    """One size per batch of an epoch, balanced over the sizes, in a random order.

    Args:
        sizes: The student's sizes (see :func:`parse_image_sizes`).
        num_batches: Global batches in the epoch.
        seed: The run's seed.
        epoch: The epoch (1-based in the trainer; any non-negative integer).

    Returns:
        ``num_batches`` sizes. With a single size it is that size repeated, and nothing is drawn.
    """
    sizes = parse_image_sizes(list(sizes))
    if num_batches < 0:
        raise ValueError(f"num_batches must be non-negative, got {num_batches}.")
    if len(sizes) == 1:
        return [sizes[0]] * num_batches
    generator = size_generator(seed, epoch)
    k = len(sizes)
    # which sizes get the n % k extra batches is drawn too, so that no size is favoured over epochs
    offset = int(torch.randint(k, (1,), generator=generator))
    pool = [sizes[(offset + i) % k] for i in range(num_batches)]
    order = torch.randperm(num_batches, generator=generator).tolist()
    return [pool[i] for i in order]


class SizedImages(Dataset):
    """Items ``(index, size)`` -> ``(EvalTransform(size)(image), index)``: the student's input at a per-item size.

    Args:
        paths: Image files.
        mean: Per-channel mean of the network's normalisation.
        std: Per-channel standard deviation.
    """

    def __init__(self, paths: Sequence[str | Path], mean: Sequence[float], std: Sequence[float]) -> None:
        if isinstance(paths, (str, Path)):
            raise TypeError("paths must be a sequence of image files, got a single path; wrap it in a list.")
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("SizedImages needs at least one image path; got an empty list.")
        self.mean, self.std = list(mean), list(std)
        self._transforms: dict[int, EvalTransform] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, size = item
        if not 0 <= index < len(self.paths):
            raise IndexError(f"Index {index} out of range for a dataset of {len(self.paths)} images.")
        if size not in self._transforms:
            self._transforms[size] = EvalTransform(size, self.mean, self.std)
        return self._transforms[size](load_image(self.paths[index])), index
