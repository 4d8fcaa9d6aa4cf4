"""Image datasets: paths (+ labels) -> ``(transform(image), label)`` items.

Contract: ``ImageDataset[i]`` -> ``(transform(load_image(paths[i])), label)``; with the eval transform at size
``S`` that is ``((3, S, S) float32, int)``; the label is ``-1`` when the dataset has no labels. Datasets only
load and transform images: they never run a network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from raml.data.images import load_image
from raml.data.splits import Split

logger = logging.getLogger(__name__)

NO_LABEL = -1


class ImageDataset(Dataset):
    """Images from files, transformed on access.

    Args:
        paths: Image files.
        labels: One integer label per path, or None (every item then has label ``-1``).
        transform: ``PIL.Image (RGB) -> Tensor``, e.g. :class:`raml.data.images.EvalTransform`.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | None,
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        if isinstance(paths, str | Path):
            raise TypeError(f"paths must be a sequence of image paths, got a single path {str(paths)!r}.")
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("ImageDataset needs at least one image path; got an empty list.")
        if labels is None:
            self.labels = [NO_LABEL] * len(self.paths)
        else:
            if len(labels) != len(self.paths):
                raise ValueError(
                    f"Got {len(self.paths)} paths but {len(labels)} labels; pass one label per path (or None)."
                )
            self.labels = [int(x) for x in labels]
        if not callable(transform):
            raise TypeError(f"transform must be callable (PIL image -> tensor), got {transform!r}.")
        self.transform = transform

    @classmethod
    def from_split(cls, split: Split, transform: Callable[[Image.Image], torch.Tensor]) -> ImageDataset:
        """The images of a :class:`Split` with its labels."""
        return cls(split.abspaths(), split.labels, transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Load, convert to RGB and transform image ``index``; return it with its label."""
        if not -len(self.paths) <= index < len(self.paths):
            raise IndexError(f"Index {index} out of range for a dataset of {len(self.paths)} images.")
        return self.transform(load_image(self.paths[index])), self.labels[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, transform={self.transform!r})"
