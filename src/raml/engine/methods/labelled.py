"""What the labelled (``sym``) methods share: class-grouped batches of augmented images.

Tensor contract: :class:`AugmentedImages` ``(index, seed)`` -> ``((3, S, S) float normalised, index)``.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset
from torchvision import transforms

from raml.data.images import load_image
from raml.engine.methods.base import Method

GROUP_SIZE = 4  # images per class in a sym-mode group: the reference's constant spc = 4 (not --pos-num)


class AugmentedImages(Dataset):
    """Training images for ``sym``: random resized crop at ``size`` + horizontal flip, normalised.

    Items are requested as ``(index, seed)``: each draw is seeded by the sampler, so an image's augmentation
    depends on its place in the epoch only, not on the worker or the process that loads it (this is what
    makes a multi-process run equal to a single-process one). Returns ``(image, index)``.
    """

    def __init__(self, paths: list[str], size: int, mean: list[float], std: list[float]) -> None:
        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        image = load_image(self.paths[index])
        # torchvision's random transforms draw from the CPU generator: seed that one only. torch.manual_seed would
        # also queue a seed for every accelerator (CUDA, XPU, MTIA) that is not initialised, each time formatting
        # the call stack (traceback.format_stack): 0.1-2.4 ms per image, by the stack's depth, for the same draws
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(image), index


class LabelledMethod(Method):
    """Batches of ``GROUP_SIZE`` images per class, ``batch_size // GROUP_SIZE`` groups per batch."""

    labels = True

    def groups_per_batch(self) -> int:
        return max(1, self.run.config.batch_size // GROUP_SIZE)

    def batches_per_epoch(self) -> int:
        groups = max(1, self.run.epoch_size // GROUP_SIZE)
        return math.ceil(groups / self.groups_per_batch())

    def augmented_images(self) -> AugmentedImages:
        student = self.run.student
        return AugmentedImages(
            self.run.train_paths, self.run.config.image_size, student.meta["mean"], student.meta["std"]
        )
