"""Data: dataset names -> splits (paths + labels), image files -> RGB images -> tensors.

``get_split("cub-test", data_root)`` -> :class:`Split`; ``load_image(path)`` -> RGB ``PIL.Image``;
``EvalTransform(S, mean, std)(img)`` -> ``(3, S, S)`` float32; ``ImageDataset.from_split(split, transform)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raml import lazy_exports

if TYPE_CHECKING:  # the names, for type checkers and tests/test_layering.py
    from raml.data.datasets import ImageDataset
    from raml.data.images import EvalTransform, ImageLoadError, eval_resize_size, load_image, resize_shorter, to_rgb
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

# name -> the module that defines it; imported on first use (module __getattr__ below), so that importing
# one submodule (or a light command) does not import every other submodule's dependencies
_EXPORTS: dict[str, str] = {
    "ImageDataset": "raml.data.datasets",
    "EvalTransform": "raml.data.images",
    "ImageLoadError": "raml.data.images",
    "eval_resize_size": "raml.data.images",
    "load_image": "raml.data.images",
    "resize_shorter": "raml.data.images",
    "to_rgb": "raml.data.images",
    "DATASETS": "raml.data.splits",
    "DOWNLOAD_COMMANDS": "raml.data.splits",
    "DatasetNotFoundError": "raml.data.splits",
    "Split": "raml.data.splits",
    "available_datasets": "raml.data.splits",
    "get_split": "raml.data.splits",
    "register_dataset": "raml.data.splits",
    "split_from_lists": "raml.data.splits",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
