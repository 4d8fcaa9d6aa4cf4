"""``AugmentedImages``, the ``sym`` methods' training images: each item's augmentation is a function of its seed
alone, the draws torchvision's transforms make after ``torch.manual_seed(seed)``, without touching any
accelerator's random state (seeding those formats the call stack each time, per image)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import transforms

from raml.data.images import load_image
from raml.data.synth import generate_synthetic_dataset
from raml.engine.methods.labelled import AugmentedImages

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    root = generate_synthetic_dataset(tmp_path_factory.mktemp("labelled") / "cub", 2, 3, image_size=48, seed=4)
    return sorted(str(p) for p in Path(root).rglob("*.jpg"))


def test_each_item_is_the_transform_drawn_after_torch_manual_seed_of_its_seed(paths):
    dataset = AugmentedImages(paths, 24, MEAN, STD)
    expected_transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(24, scale=(0.08, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    for index, seed in [(0, 0), (1, 7), (len(paths) - 1, 2**31 + 5), (0, 7)]:
        torch.manual_seed(seed)
        expected = expected_transform(load_image(paths[index]))
        image, returned = dataset[(index, seed)]
        assert returned == index and image.shape == (3, 24, 24)
        torch.testing.assert_close(image, expected, rtol=0, atol=0)
    first, _ = dataset[(0, 0)]
    assert not torch.equal(first, dataset[(0, 7)][0])  # another seed, another crop


def test_an_item_leaves_the_global_generator_and_the_accelerators_alone(paths, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("an accelerator's generator was seeded for a CPU augmentation")

    for module in (torch.cuda, getattr(torch, "xpu", None), getattr(torch, "mtia", None)):
        if module is not None and hasattr(module, "manual_seed_all"):
            monkeypatch.setattr(module, "manual_seed_all", refuse)
    dataset = AugmentedImages(paths, 24, MEAN, STD)
    torch.default_generator.manual_seed(123)
    state = torch.get_rng_state()
    dataset[(1, 9)]
    assert torch.equal(torch.get_rng_state(), state)  # fork_rng: the caller's draws are not moved
