"""Data: dataset names -> splits (paths + labels), image files -> RGB images -> tensors.

``get_split("cub-test", data_root)`` -> :class:`Split`; ``load_image(path)`` -> RGB ``PIL.Image``;
``EvalTransform(S, mean, std)(img)`` -> ``(3, S, S)`` float32; ``ImageDataset.from_split(split, transform)``.
"""

from __future__ import annotations

from raml.data.datasets import ImageDataset
from raml.data.images import (
    EvalTransform,
    ImageLoadError,
    eval_resize_size,
    load_image,
    resize_shorter,
    to_rgb,
)
from raml.data.splits import (
    DATASETS,
    DOWNLOAD_COMMANDS,
    DatasetNotFoundError,
    Split,
    available_datasets,
    get_split,
    register_dataset,
    split_from_lists,
)

__all__ = [
    "DATASETS",
    "DOWNLOAD_COMMANDS",
    "DatasetNotFoundError",
    "EvalTransform",
    "ImageDataset",
    "ImageLoadError",
    "Split",
    "available_datasets",
    "eval_resize_size",
    "get_split",
    "load_image",
    "register_dataset",
    "resize_shorter",
    "split_from_lists",
    "to_rgb",
]
