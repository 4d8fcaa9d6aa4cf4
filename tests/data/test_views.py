"""Coupled views: sampling rule, rendering, reproducibility, both mixups (batch and reference partners)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms

from raml.data.buffers import BufferPool
from raml.data.images import ImageLoadError, load_image
from raml.data.views import (
    CoupledViewDataset,
    ViewParams,
    batch_loader_arguments,
    mix_partner_views,
    mixup_views,
    render_coupled_views,
    sample_view_params,
)


def _smooth_image(width: int = 80, height: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(1, height // 10), max(1, width // 10), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        _smooth_image(48 + 8 * i, 40, seed=i).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- sampling


def test_sampler_matches_torchvision_draw_for_draw():
    img = Image.new("RGB", (50, 37))
    rrc = transforms.RandomResizedCrop(8, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    for seed in range(40):
        params = sample_view_params(50, 37, torch.Generator().manual_seed(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            top, left, height, width = rrc.get_params(img, rrc.scale, rrc.ratio)
            flip = bool(torch.rand(1) < 0.5)
            order, b, c, s, h = transforms.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
        assert (params.top, params.left, params.height, params.width) == (top, left, height, width)
        assert params.flip == flip
        assert params.order == tuple(int(i) for i in order)
        assert (params.brightness, params.contrast, params.saturation, params.hue) == (b, c, s, h)


@pytest.mark.parametrize(("width", "height"), [(500, 375), (64, 200), (37, 29), (1, 1)])
def test_crop_boxes_stay_inside_and_respect_ranges(width, height):
    g = torch.Generator().manual_seed(1)
    flips, hues = [], []
    for _ in range(300):
        p = sample_view_params(width, height, g)
        assert p.left >= 0 and p.left + p.width <= width and p.top >= 0 and p.top + p.height <= height
        assert p.width >= 1 and p.height >= 1
        if width * height >= 10_000:  # rounding to whole pixels is negligible only on real-sized images
            assert 0.08 * 0.97 <= p.width * p.height / (width * height) <= 1.0
            assert 3 / 4 * 0.97 <= p.width / p.height <= 4 / 3 * 1.03
        assert 0.6 <= p.brightness <= 1.4 and 0.6 <= p.contrast <= 1.4 and 0.6 <= p.saturation <= 1.4
        assert sorted(p.order) == [0, 1, 2, 3]
        flips.append(p.flip)
        hues.append(p.hue)
    assert 0.35 < np.mean(flips) < 0.65
    assert -0.1 <= min(hues) < -0.07 and 0.07 < max(hues) <= 0.1


def test_fallback_is_a_central_crop_with_clamped_ratio():
    # Far too wide: no try can fit, so the rule falls back to a central crop with ratio 4/3.
    p = sample_view_params(1000, 10, torch.Generator().manual_seed(0))
    assert (p.top, p.height, p.width) == (0, 10, 13) and p.left == (1000 - 13) // 2
    p = sample_view_params(10, 1000, torch.Generator().manual_seed(0))
    assert (p.left, p.width, p.height) == (0, 10, 13) and p.top == (1000 - 13) // 2


def test_sampler_bad_inputs():
    g = torch.Generator()
    with pytest.raises(ValueError, match="positive size"):
        sample_view_params(0, 10, g)
    with pytest.raises(ValueError, match="integers"):
        sample_view_params(10.5, 10, g)
    with pytest.raises(TypeError, match="torch.Generator"):
        sample_view_params(10, 10, 123)


# ---------------------------------------------------------------- rendering


def _plain(img: Image.Image, **kw) -> ViewParams:
    return ViewParams(top=0, left=0, height=img.height, width=img.width, flip=False, **kw)


def test_geometry_without_jitter_is_crop_flip_resize():
    img = _smooth_image(80, 60)
    view = ViewParams(top=5, left=10, height=40, width=50, flip=False)
    student, teacher = render_coupled_views(img, [view, ViewParams(5, 10, 40, 50, True)], 16, 32)
    assert student.shape == (2, 3, 16, 16) and teacher.shape == (2, 3, 32, 32)
    assert student.dtype == teacher.dtype == torch.uint8
    expected = np.asarray(img.crop((10, 5, 60, 45)).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(teacher[0].permute(1, 2, 0).numpy(), expected)
    assert (teacher[1].flip(-1).int() - teacher[0].int()).abs().max() <= 1


def _sequential_jitter(pixels: np.ndarray, view: ViewParams) -> np.ndarray:
    """Slow reference of the fused mode: the four operations one after another in float64, clipped once at
    the end, hue as a rotation about the grey axis."""
    x = pixels.reshape(-1, 3).astype(np.float64)
    luma = np.array([0.299, 0.587, 0.114])
    for op in view.order:
        if op == 0:
            x = x * view.brightness
        elif op == 1:
            x = view.contrast * x + (1 - view.contrast) * float((x @ luma).mean())
        elif op == 2:
            x = view.saturation * x + (1 - view.saturation) * (x @ luma)[:, None]
        else:
            # Rotate the chroma part (x minus its grey projection) in the plane orthogonal to (1, 1, 1),
            # in the basis e1 = red's chroma direction, e2 = its 90-degree turn towards green.
            grey = x.mean(axis=1, keepdims=True)
            chroma = x - grey
            e1 = np.array([2.0, -1.0, -1.0]) / math.sqrt(6)
            e2 = np.array([0.0, 1.0, -1.0]) / math.sqrt(2)
            a, b = chroma @ e1, chroma @ e2
            theta = 2 * math.pi * view.hue
            a2, b2 = a * math.cos(theta) - b * math.sin(theta), a * math.sin(theta) + b * math.cos(theta)
            x = grey + a2[:, None] * e1 + b2[:, None] * e2
    return np.clip(x, 0, 255).reshape(pixels.shape)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)])
def test_fused_jitter_matches_sequential_float_reference(order):
    img = _smooth_image(32, 32, seed=3)
    view = _plain(img, brightness=1.2, contrast=0.7, saturation=1.3, hue=0.08, order=order)
    _, teacher = render_coupled_views(img, [view], 16, 32, fused=True)
    expected = _sequential_jitter(np.asarray(img), view)
    got = teacher[0].permute(1, 2, 0).numpy().astype(np.float64)
    assert np.abs(got - expected).max() <= 1.0  # PIL rounds to the nearest level


def test_fused_jitter_commutes_with_the_resize():
    # A crop larger than the DR view is jittered after the resize, a smaller one before: same result.
    img = _smooth_image(48, 48, seed=5)
    view = _plain(img, brightness=0.8, contrast=1.3, saturation=0.7, hue=-0.06, order=(2, 0, 3, 1))
    _, teacher = render_coupled_views(img, [view], 16, 32, fused=True)
    got = teacher[0].permute(1, 2, 0).numpy().astype(np.float64)
    resized = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(got - _sequential_jitter(resized, view)).max() <= 1.0
    jitter_first = Image.fromarray(np.rint(_sequential_jitter(np.asarray(img), view)).astype(np.uint8))
    other_order = np.asarray(jitter_first.resize((32, 32), Image.Resampling.BILINEAR)).astype(np.float64)
    assert np.abs(got - other_order).mean() < 0.5 and np.abs(got - other_order).max() <= 3


@pytest.mark.parametrize("fused", [False, True])
def test_hue_direction_and_grey_invariance(fused):
    # A positive shift moves red towards yellow (green rises), as HSV hue does; greys stay grey.
    img = Image.new("RGB", (8, 8), (200, 40, 40))
    img.paste((128, 128, 128), (0, 0, 4, 8))
    _, teacher = render_coupled_views(img, [_plain(img, hue=0.05)], 8, 8, fused=fused)
    red, grey = teacher[0, :, 0, 7].tolist(), teacher[0, :, 0, 0].tolist()
    assert red[1] > 40 + 20 and red[2] <= 40 and red[0] >= 195 and grey == [128, 128, 128]


def test_fused_student_is_the_teacher_resized():
    img = _smooth_image(200, 150, seed=4)
    params = [sample_view_params(200, 150, torch.Generator().manual_seed(s)) for s in range(6)]
    student, teacher = render_coupled_views(img, params, 32, 64, fused=True)
    # Independent resize (torch, antialiased bilinear) of the teacher view, in [0, 1] units.
    resized = F.interpolate(teacher.float() / 255, size=(32, 32), mode="bilinear", antialias=True)
    same = (student.float() / 255 - resized).abs().mean(dim=(1, 2, 3))
    other = (student.float() / 255 - resized.roll(1, dims=0)).abs().mean(dim=(1, 2, 3))
    assert same.max() < 0.02
    assert other.min() > 5 * same.max()


def _torchvision_view(img: Image.Image, size: int, seed: int) -> np.ndarray:
    """The reference's view at one size: torchvision's RandomResizedCrop(size) + flip + ColorJitter on the PIL
    image, torch's RNG seeded with the view's seed (its get_random_aug)."""
    pipeline = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(0.5),
            transforms.ColorJitter(brightness=0.4, hue=0.1, saturation=0.4, contrast=0.4),
        ]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return np.asarray(pipeline(img)).astype(np.int16)


def _hwc(view: torch.Tensor) -> np.ndarray:
    return view.permute(1, 2, 0).numpy().astype(np.int16)


@pytest.mark.parametrize(("width", "height"), [(120, 90), (70, 100)])
def test_default_views_are_torchvision_at_each_resolution(width, height):
    # The reference renders each resolution on its own from the crop box: equal pixels at QR and DR.
    img = _smooth_image(width, height, seed=width)
    seeds = list(range(10))
    params = [sample_view_params(width, height, torch.Generator().manual_seed(s)) for s in seeds]
    for student_size, teacher_size in ((24, 64), (40, 40)):
        student, teacher = render_coupled_views(img, params, student_size, teacher_size, backend="pil")
        for k, seed in enumerate(seeds):
            assert np.array_equal(_hwc(teacher[k]), _torchvision_view(img, teacher_size, seed)), seed
            assert np.array_equal(_hwc(student[k]), _torchvision_view(img, student_size, seed)), seed


def test_default_views_with_the_torch_resize_within_a_grey_level():
    # The torch backend's resize rounds differently (within one level before the jitter); the jitter's
    # 8-bit HSV round trip can turn that into a few levels at single pixels, well under one on average.
    img = _smooth_image(150, 110, seed=9)
    seeds = list(range(10))
    params = [sample_view_params(150, 110, torch.Generator().manual_seed(s)) for s in seeds]
    student, teacher = render_coupled_views(img, params, 32, 64, backend="torch")
    means = []
    for k, seed in enumerate(seeds):
        for view, size in ((student[k], 32), (teacher[k], 64)):
            diff = np.abs(_hwc(view) - _torchvision_view(img, size, seed))
            means.append(diff.mean())
            assert diff.mean() < 1.0 and diff.max() <= 16, (seed, size)
    assert np.mean(means) < 0.25


def test_default_student_is_not_the_teacher_resized():
    # The student view is the crop resized straight to QR (sharp), not the DR view downsized (blurred):
    # on a noise image the straight resize keeps more gradient energy than the fused mode's two steps.
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    geometry = [ViewParams(10, 20, 100, 120, False), ViewParams(0, 0, 120, 160, True)]
    student, _ = render_coupled_views(img, geometry, 32, 64, backend="pil")
    fused_student, _ = render_coupled_views(img, geometry, 32, 64, backend="pil", fused=True)
    for k, view in enumerate(geometry):
        crop = img.crop(view.box).resize((32, 32), Image.Resampling.BILINEAR)
        if view.flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert np.array_equal(_hwc(student[k]), np.asarray(crop).astype(np.int16))

    def energy(views: torch.Tensor) -> float:
        x = views.double()
        return float((x.diff(dim=-1) ** 2).mean() + (x.diff(dim=-2) ** 2).mean())

    assert energy(student) > 1.3 * energy(fused_student)  # measured: 1.6x


def test_render_bad_inputs():
    img = _smooth_image(40, 30)
    view = _plain(img)
    with pytest.raises(ValueError, match="must not exceed teacher_size"):
        render_coupled_views(img, [view], 64, 32)
    with pytest.raises(ValueError, match="outside the 40 x 30 image"):
        render_coupled_views(img, [ViewParams(0, 0, 31, 40, False)], 16, 32)
    with pytest.raises(ValueError, match="params is empty"):
        render_coupled_views(img, [], 16, 32)
    with pytest.raises(ValueError, match="student_size must be a positive integer"):
        render_coupled_views(img, [view], 0, 32)
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        render_coupled_views(np.zeros((30, 40, 3)), [view], 16, 32)
    with pytest.raises(TypeError, match=r"params\[0\] must be a ViewParams"):
        render_coupled_views(img, [(0, 0, 30, 40)], 16, 32)
    # Non-RGB input is converted.
    student, _ = render_coupled_views(img.convert("L"), [view], 16, 32)
    assert student.shape == (1, 3, 16, 16)


# ---------------------------------------------------------------- dataset


def test_dataset_reproducible_and_seeded_per_item(image_files):
    ds = CoupledViewDataset(image_files, 16, 32, pos_num=2, seed=7)
    s0, t0, i0 = ds[0]
    assert s0.shape == (2, 3, 16, 16) and t0.shape == (2, 3, 32, 32) and i0 == 0
    again = CoupledViewDataset(image_files, 16, 32, pos_num=2, seed=7)[0]
    assert torch.equal(again[0], s0) and torch.equal(again[1], t0)
    assert not torch.equal(CoupledViewDataset(image_files, 16, 32, pos_num=2, seed=8)[0][1], t0)
    ds.set_epoch(1)
    assert not torch.equal(ds[0][1], t0)
    ds.set_epoch(0)
    assert torch.equal(ds[0][1], t0)
    # Same image under a different index draws different views.
    twin = CoupledViewDataset([image_files[0], image_files[0]], 16, 32, pos_num=2, seed=7)
    assert not torch.equal(twin[0][1], twin[1][1])


def test_dataset_independent_of_workers_and_order(image_files):
    ds = CoupledViewDataset(image_files, 8, 16, pos_num=2, seed=3)
    direct = [ds[i] for i in (2, 0, 1)]
    batches = list(DataLoader(ds, batch_size=3, sampler=[2, 0, 1], num_workers=1))
    assert len(batches) == 1
    student, teacher, index = batches[0]
    assert student.shape == (3, 2, 3, 8, 8) and teacher.shape == (3, 2, 3, 16, 16)
    assert index.tolist() == [2, 0, 1]
    for k in range(3):
        assert torch.equal(student[k], direct[k][0]) and torch.equal(teacher[k], direct[k][1])


def test_dataset_fused_flag(image_files):
    default = CoupledViewDataset(image_files, 16, 32, pos_num=3, seed=4)
    fused = CoupledViewDataset(image_files, 16, 32, pos_num=3, seed=4, fused=True)
    assert default.fused is False and fused.fused is True
    img = load_image(image_files[1])
    generator = default.generator_for(1)
    params = [sample_view_params(img.width, img.height, generator) for _ in range(3)]
    for dataset, flag in ((default, False), (fused, True)):
        student, teacher, _ = dataset[1]
        expected = render_coupled_views(img, params, 16, 32, backend="pil", fused=flag)
        assert torch.equal(student, expected[0]) and torch.equal(teacher, expected[1])
    partner_fused = CoupledViewDataset(image_files, 16, 32, pos_num=3, seed=4, partners=True, fused=True)
    assert not torch.equal(partner_fused[0][0], CoupledViewDataset(image_files, 16, 32, 3, 4, partners=True)[0][0])
    with pytest.raises(TypeError, match="fused must be a bool"):
        CoupledViewDataset(image_files, 16, 32, 3, 4, fused="yes")


def test_dataset_bad_inputs(image_files, tmp_path):
    with pytest.raises(ValueError, match="paths is empty"):
        CoupledViewDataset([], 16, 32, 2, 0)
    with pytest.raises(TypeError, match="single path"):
        CoupledViewDataset(str(image_files[0]), 16, 32, 2, 0)
    with pytest.raises(ValueError, match="pos_num must be a positive integer"):
        CoupledViewDataset(image_files, 16, 32, 0, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        CoupledViewDataset(image_files, 16, 32, 2, -1)
    with pytest.raises(ValueError, match="must not exceed teacher_size"):
        CoupledViewDataset(image_files, 64, 32, 2, 0)
    ds = CoupledViewDataset(image_files, 16, 32, 2, 0)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        ds.set_epoch(-1)
    with pytest.raises(IndexError, match="out of range"):
        ds[3]
    missing = CoupledViewDataset([tmp_path / "nope.jpg"], 16, 32, 2, 0)
    with pytest.raises(ImageLoadError, match="nope.jpg"):
        missing[0]


# ---------------------------------------------------------------- mixup


def _constant_views(batch: int, views: int, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """View (b, i) is constant: channel 0 = its code v, channel 1 = v ** 2, channel 2 = 1."""
    codes = np.arange(1, batch * views + 1, dtype=np.float64).reshape(batch, views)
    x = torch.zeros(batch, views, 3, size, size, dtype=torch.float64)
    x[:, :, 0] = torch.from_numpy(codes)[..., None, None]
    x[:, :, 1] = torch.from_numpy(codes**2)[..., None, None]
    x[:, :, 2] = 1.0
    return x, codes


def _decode_mix(mixed: torch.Tensor, codes: np.ndarray) -> dict[tuple[int, int], tuple[float, tuple]]:
    """Solve each mixed constant view for its (lambda, partner) by trying every candidate partner."""
    batch, views = codes.shape
    found = {}
    for b in range(batch):
        for i in range(views):
            m0, m1, m2 = (float(mixed[b, i, c].mean()) for c in range(3))
            assert abs(m2 - 1.0) < 1e-9 and float((mixed[b, i] - mixed[b, i, :, :1, :1]).abs().max()) < 1e-9
            v = codes[b, i]
            matches = []
            for pb in range(batch):
                for pi in range(views):
                    w = codes[pb, pi]
                    if w == v:
                        if abs(m0 - v) < 1e-9 and abs(m1 - v * v) < 1e-9:
                            matches.append((1.0, (pb, pi)))
                        continue
                    lam = (m0 - w) / (v - w)
                    if -1e-9 <= lam <= 1 + 1e-9 and abs(lam * v * v + (1 - lam) * w * w - m1) < 1e-6:
                        matches.append((lam, (pb, pi)))
            assert len(matches) == 1, (b, i, matches)
            found[(b, i)] = matches[0]
    return found


@pytest.mark.parametrize(("batch", "views"), [(4, 3), (2, 2), (1, 3)])
def test_mixup_same_lambda_and_partner_at_both_resolutions(batch, views):
    student, codes = _constant_views(batch, views, 4)
    teacher, _ = _constant_views(batch, views, 8)
    mixed_s, mixed_t = mixup_views(student, teacher, torch.Generator().manual_seed(0), alpha=1.0)
    assert mixed_s.shape == student.shape and mixed_t.shape == teacher.shape
    found_s, found_t = _decode_mix(mixed_s, codes), _decode_mix(mixed_t, codes)
    for key, (lam, partner) in found_s.items():
        assert partner == found_t[key][1] and abs(lam - found_t[key][0]) < 1e-9
        b, i = key
        if batch > 1:
            assert partner[0] != b  # another image of the batch
        else:
            assert partner == (0, partner[1]) and partner[1] != i  # another view of the same image
    # Inputs are untouched, and the same generator state gives the same mix.
    assert torch.equal(student, _constant_views(batch, views, 4)[0])
    again_s, again_t = mixup_views(student, teacher, torch.Generator().manual_seed(0), alpha=1.0)
    assert torch.equal(again_s, mixed_s) and torch.equal(again_t, mixed_t)


def test_mixup_uint8_input_equals_float_input():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 256, (3, 2, 3, 4, 4), generator=g, dtype=torch.uint8)
    t = torch.randint(0, 256, (3, 2, 3, 8, 8), generator=g, dtype=torch.uint8).permute(0, 1, 2, 4, 3)
    from_u8 = mixup_views(s, t, torch.Generator().manual_seed(5))
    from_float = mixup_views(s.float(), t.float(), torch.Generator().manual_seed(5))
    assert from_u8[0].dtype == from_u8[1].dtype == torch.float32
    assert torch.equal(from_u8[0], from_float[0]) and torch.equal(from_u8[1], from_float[1])


def test_mixup_single_image_single_view_is_unchanged():
    x = torch.rand(1, 1, 3, 4, 4)
    y = torch.rand(1, 1, 3, 8, 8)
    mixed_s, mixed_t = mixup_views(x, y, torch.Generator().manual_seed(0))
    assert torch.allclose(mixed_s, x) and torch.allclose(mixed_t, y)


def test_mixup_lambda_follows_beta():
    # Two images, one view each: the partner is always the other image, so lambda can be read off.
    student = torch.tensor([1.0, 2.0], dtype=torch.float64).view(2, 1, 1, 1, 1)
    lams = []
    for seed in range(150):
        mixed, _ = mixup_views(student, student.clone(), torch.Generator().manual_seed(seed))
        lams += [float(mixed[0].squeeze()) - 1.0, 2.0 - float(mixed[1].squeeze())]  # lam * v + (1 - lam) * w
    lams = np.array(lams)
    assert lams.min() >= -1e-12 and lams.max() <= 1 + 1e-12
    # Both entries are 1 - lam, which has the same Beta(a, a) law as lam.
    # Beta(0.2, 0.2) is U-shaped: most weights lie near 0 or 1, mean 1/2.
    assert 0.4 < lams.mean() < 0.6 and np.mean((lams < 0.1) | (lams > 0.9)) > 0.5


def test_mixup_bad_inputs():
    g = torch.Generator()
    s, t = torch.zeros(2, 3, 3, 4, 4), torch.zeros(2, 3, 3, 8, 8)
    with pytest.raises(TypeError, match=r"floating-point or uint8"):
        mixup_views(s.long(), t.long(), g)
    with pytest.raises(TypeError, match="same dtype"):
        mixup_views(s.double(), t, g)
    with pytest.raises(ValueError, match="must agree on"):
        mixup_views(s, torch.zeros(3, 3, 3, 8, 8), g)
    with pytest.raises(ValueError, match=r"shape \(B, P, C, S, S\)"):
        mixup_views(s[0], t, g)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        mixup_views(s, t, g, alpha=0.0)
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        mixup_views(s, t, None)


# ---------------------------------------------------------------- resize backends


def test_torch_backend_is_the_pil_filter_within_one_level():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))  # noise
    g = torch.Generator().manual_seed(0)
    geometry = [
        ViewParams(p.top, p.left, p.height, p.width, p.flip) for p in (sample_view_params(120, 90, g) for _ in range(8))
    ]
    for student_size, teacher_size in ((16, 32), (24, 64), (40, 40)):
        pil = render_coupled_views(img, geometry, student_size, teacher_size, backend="pil")
        fast = render_coupled_views(img, geometry, student_size, teacher_size, backend="torch")
        for a, b in zip(pil, fast, strict=True):
            assert a.shape == b.shape and b.dtype == torch.uint8
            diff = (a.int() - b.int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 0.05
    # With jitter the fused twist can scale a one-level resize difference by its gain (contrast, saturation).
    jittered = [sample_view_params(120, 90, g) for _ in range(8)]
    pil = render_coupled_views(img, jittered, 16, 32, backend="pil", fused=True)
    fast = render_coupled_views(img, jittered, 16, 32, backend="torch", fused=True)
    for a, b in zip(pil, fast, strict=True):
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 4 and diff.float().mean() < 0.1


def test_unknown_backend():
    img = _smooth_image(40, 30)
    with pytest.raises(ValueError, match="backend must be one of 'pil', 'torch'"):
        render_coupled_views(img, [_plain(img)], 16, 32, backend="cv2")


# ---------------------------------------------------------------- reference partners (partners=True)


def _partner_dataset(paths, **kw) -> CoupledViewDataset:
    return CoupledViewDataset(paths, 16, 32, pos_num=4, seed=11, partners=True, **kw)


def test_partner_item_shapes_dtypes_and_defaults(image_files):
    ds = _partner_dataset(image_files)
    assert ds.backend == "torch" and CoupledViewDataset(image_files, 16, 32, 4, 11).backend == "pil"
    student, teacher, partner_student, partner_teacher, lam, index = ds[1]
    assert index == 1
    assert student.shape == partner_student.shape == (4, 3, 16, 16)
    assert teacher.shape == partner_teacher.shape == (4, 3, 32, 32)
    assert student.dtype == teacher.dtype == partner_student.dtype == partner_teacher.dtype == torch.uint8
    assert lam.shape == (4,) and lam.dtype == torch.float32
    assert torch.equal(lam, torch.tensor(ds.partner_draws(1).lam))
    assert ds.partner_draws(1) == _partner_dataset(image_files).partner_draws(1)  # a plain value


def test_partner_items_depend_only_on_seed_epoch_index(image_files):
    ds = _partner_dataset(image_files)
    items = {i: ds[i] for i in (2, 0, 1)}
    again = _partner_dataset(image_files)
    for i in (0, 1, 2):  # another instance, another order
        for a, b in zip(items[i][:5], again[i][:5], strict=True):
            assert torch.equal(a, b)
    # Through a worker process, in yet another order: the same items, collated.
    (batch,) = list(DataLoader(ds, batch_size=3, sampler=[1, 2, 0], num_workers=1))
    assert batch[0].shape == (3, 4, 3, 16, 16) and batch[4].shape == (3, 4) and batch[5].tolist() == [1, 2, 0]
    for k, i in enumerate((1, 2, 0)):
        for field in range(5):
            assert torch.equal(batch[field][k], items[i][field])
    ds.set_epoch(1)
    assert not torch.equal(ds[0][1], items[0][1]) and ds.partner_draws(0) != again.partner_draws(0)
    other_seed = CoupledViewDataset(image_files, 16, 32, pos_num=4, seed=12, partners=True)
    assert other_seed.partner_draws(0).view_seeds != again.partner_draws(0).view_seeds


def test_partner_view_is_drawn_with_the_view_seed_on_the_partner_size(tmp_path):
    # Images of four different sizes, so the partner's draws on its own size differ from the view's.
    paths = []
    for k, (w, h) in enumerate(((64, 48), (40, 56), (90, 30), (50, 50))):
        paths.append(tmp_path / f"p{k}.png")
        _smooth_image(w, h, seed=10 + k).save(paths[-1])
    ds = CoupledViewDataset(paths, 16, 32, pos_num=6, seed=3, partners=True)
    rrc = transforms.RandomResizedCrop(8, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    checked_other = 0
    for index in range(len(paths)):
        student, teacher, partner_student, partner_teacher, _, _ = ds[index]
        draws = ds.partner_draws(index)
        img = load_image(paths[index])
        for slot, (view_seed, partner) in enumerate(zip(draws.view_seeds, draws.partners, strict=True)):
            partner_img = load_image(paths[partner])
            view = sample_view_params(img.width, img.height, torch.Generator().manual_seed(view_seed))
            partner_view = sample_view_params(
                partner_img.width, partner_img.height, torch.Generator().manual_seed(view_seed)
            )
            # The reference's rule: reseed torch's RNG with the view's seed, then run the same sampling code
            # on the partner image (here checked against torchvision's own RandomResizedCrop + flip).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed)
                box = rrc.get_params(partner_img, rrc.scale, rrc.ratio)
                flip = bool(torch.rand(1) < 0.5)
            assert (partner_view.top, partner_view.left, partner_view.height, partner_view.width) == box
            assert partner_view.flip == flip
            # Explicit re-renders equal the dataset's views and partner views.
            s, t = render_coupled_views(img, [view], 16, 32, backend="torch")
            ps, pt = render_coupled_views(partner_img, [partner_view], 16, 32, backend="torch")
            assert torch.equal(student[slot], s[0]) and torch.equal(teacher[slot], t[0])
            assert torch.equal(partner_student[slot], ps[0]) and torch.equal(partner_teacher[slot], pt[0])
            if partner != index:
                checked_other += 1
                assert view.box != partner_view.box  # not the view's box reused on another image
    assert checked_other >= 10


def test_each_partner_decoded_once_per_item_and_self_partner_is_the_view(image_files):
    calls: list[Path] = []

    def counting_loader(path):
        calls.append(Path(path))
        return load_image(path)

    ds = CoupledViewDataset(image_files, 16, 32, pos_num=8, seed=0, partners=True, loader=counting_loader)
    saw_self = False
    for index in range(len(image_files)):
        calls.clear()
        student, teacher, partner_student, partner_teacher, _, _ = ds[index]
        partners = ds.partner_draws(index).partners
        assert len(calls) == len(set(calls)) == 1 + len(set(partners) - {index})
        for slot, partner in enumerate(partners):
            if partner == index:
                saw_self = True
                assert torch.equal(partner_student[slot], student[slot])
                assert torch.equal(partner_teacher[slot], teacher[slot])
    assert saw_self  # 3 images x 8 views: an item is its own partner in practice


def test_partner_indices_uniform_over_the_whole_dataset(tmp_path):
    paths = [tmp_path / f"x{i}.jpg" for i in range(10)]  # never decoded: only the draws are used
    ds = CoupledViewDataset(paths, 16, 32, pos_num=8, seed=5, partners=True)
    partners, own = [], []
    for epoch in range(50):
        ds.set_epoch(epoch)
        for index in range(10):
            drawn = ds.partner_draws(index).partners
            partners += drawn
            own += [p == index for p in drawn]
    counts = np.bincount(partners, minlength=10)
    assert counts.sum() == 4000 and counts.min() > 320 and counts.max() < 480  # 400 expected, sd ~19
    assert 0.08 < np.mean(own) < 0.12  # itself with probability 1/10 (sd ~0.005), as in the reference


def _beta_cdf(x: np.ndarray, alpha: float) -> np.ndarray:
    from scipy.special import betainc  # the regularised incomplete beta function is the Beta CDF

    return betainc(alpha, alpha, x)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_lambda_follows_beta(tmp_path, alpha):
    ds = CoupledViewDataset([tmp_path / "a.jpg"] * 500, 16, 32, pos_num=8, seed=2, partners=True, alpha=alpha)
    lam = np.sort(np.concatenate([ds.partner_draws(i).lam for i in range(500)]).astype(np.float64))  # 4000
    assert lam.min() >= 0.0 and lam.max() <= 1.0
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); Kolmogorov-Smirnov distance to its CDF below the
    # 0.1 % critical value 1.95 / sqrt(n).
    assert abs(lam.mean() - 0.5) < 0.03
    assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.015
    cdf = _beta_cdf(lam, alpha)
    n = len(lam)
    ks = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
    assert ks < 1.95 / math.sqrt(n)


def test_partner_dataset_bad_inputs(image_files):
    with pytest.raises(TypeError, match="partners must be a bool"):
        CoupledViewDataset(image_files, 16, 32, 2, 0, partners=1)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        CoupledViewDataset(image_files, 16, 32, 2, 0, partners=True, alpha=0)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        CoupledViewDataset(image_files, 16, 32, 2, 0, partners=True, alpha=float("nan"))
    with pytest.raises(ValueError, match="backend must be one of"):
        CoupledViewDataset(image_files, 16, 32, 2, 0, backend="opencv")
    with pytest.raises(IndexError, match="out of range"):
        _partner_dataset(image_files).partner_draws(3)


# ---------------------------------------------------------------- mix_partner_views


def _loop_mix(x: torch.Tensor, p: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Slow reference: every pixel of every view, in float64."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            w = float(lam[b, i])
            out[b, i] = w * x[b, i].double() + (1 - w) * p[b, i].double()
    return out


def _views(batch, views, size, dtype, generator, channels_last=False) -> torch.Tensor:
    x = torch.randint(0, 256, (batch, views, size, size, 3), generator=generator, dtype=torch.uint8)
    x = x.permute(0, 1, 4, 2, 3) if channels_last else x.permute(0, 1, 4, 2, 3).contiguous()
    return x if dtype == torch.uint8 else x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mix_partner_views_matches_a_plain_loop(dtype, channels_last):
    g = torch.Generator().manual_seed(0)
    s, t = _views(3, 2, 4, dtype, g, channels_last), _views(3, 2, 8, dtype, g, channels_last)
    ps, pt = _views(3, 2, 4, dtype, g, channels_last), _views(3, 2, 8, dtype, g, channels_last)
    lam = torch.tensor([[0.0, 1.0], [0.3, 0.97], [0.5, 1e-4]])
    before = [v.clone() for v in (s, t, ps, pt)]
    mixed_s, mixed_t = mix_partner_views(s, t, ps, pt, lam)
    expected_dtype = torch.float32 if dtype == torch.uint8 else dtype
    assert mixed_s.dtype == mixed_t.dtype == expected_dtype
    assert mixed_s.shape == s.shape and mixed_t.shape == t.shape
    tol = 1e-3 if expected_dtype == torch.float32 else 1e-10
    # The same lam at both resolutions.
    assert torch.allclose(mixed_s.double(), _loop_mix(s, ps, lam), atol=tol, rtol=0)
    assert torch.allclose(mixed_t.double(), _loop_mix(t, pt, lam), atol=tol, rtol=0)
    assert torch.equal(mixed_s[0, 0].double(), ps[0, 0].double())  # lam 0: the partner
    assert torch.equal(mixed_t[0, 1].double(), t[0, 1].double())  # lam 1: the view
    assert all(torch.equal(a, b) for a, b in zip(before, (s, t, ps, pt), strict=True))  # inputs untouched


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64])
def test_batched_mix_of_accelerators_matches_a_plain_loop(dtype):
    # The kernel mix_partner_views runs on non-CPU devices, exercised here on the CPU.
    from raml.data.views import _lerp_batched

    g = torch.Generator().manual_seed(1)
    x, p = _views(2, 3, 8, dtype, g, True), _views(2, 3, 8, dtype, g, True)
    lam = torch.rand(2, 3, generator=g)
    out_dtype = torch.float32 if dtype == torch.uint8 else dtype
    mixed = _lerp_batched(x, p, lam, out_dtype)
    assert mixed.dtype == out_dtype
    assert torch.allclose(mixed.double(), _loop_mix(x, p, lam), atol=1e-3, rtol=0)


def test_mix_partner_views_of_a_collated_dataset_batch(image_files):
    ds = _partner_dataset(image_files)
    (batch,) = list(DataLoader(ds, batch_size=3, sampler=[0, 1, 2]))
    mixed_s, mixed_t = mix_partner_views(*batch[:5])
    assert mixed_s.shape == (3, 4, 3, 16, 16) and mixed_t.shape == (3, 4, 3, 32, 32)
    assert torch.allclose(mixed_t.double(), _loop_mix(batch[1], batch[3], batch[4]), atol=1e-3, rtol=0)
    assert float(mixed_s.min()) >= 0 and float(mixed_s.max()) <= 255


def test_mix_partner_views_bad_inputs():
    s, t = torch.zeros(2, 3, 3, 4, 4), torch.zeros(2, 3, 3, 8, 8)
    lam = torch.full((2, 3), 0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        mix_partner_views(s.numpy(), t, s, t, lam)
    with pytest.raises(ValueError, match=r"partner_student must have shape \(B, P, C, S, S\)"):
        mix_partner_views(s, t, s[0], t, lam)
    with pytest.raises(TypeError, match="floating-point or uint8"):
        mix_partner_views(s.long(), t.long(), s.long(), t.long(), lam)
    with pytest.raises(TypeError, match="partner_teacher has dtype torch.float64"):
        mix_partner_views(s, t, s, t.double(), lam)
    with pytest.raises(ValueError, match="must have the shape of teacher"):
        mix_partner_views(s, t, s, torch.zeros(2, 3, 3, 6, 6), lam)
    with pytest.raises(ValueError, match="must agree on"):
        mix_partner_views(s, t[:1], s, t[:1], lam)
    with pytest.raises(ValueError, match=r"lam must have shape \(B, P\) = \(2, 3\)"):
        mix_partner_views(s, t, s, t, lam[:, :2])
    with pytest.raises(TypeError, match="lam must be a floating-point"):
        mix_partner_views(s, t, s, t, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        mix_partner_views(s, t, s, t, torch.full((2, 3), 1.5))
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        mix_partner_views(s, t, s, t, torch.full((2, 3), float("nan")))


# ---------------------------------------------------------------- --fused-views


def test_fused_views_flag_reaches_the_dataset(image_files, monkeypatch):
    from types import SimpleNamespace

    from raml.cli.main import build_parser
    from raml.cli.train import config_from_args
    from raml.engine.methods import coupled

    base = ["train", "--student", "resnet18", "--teacher", "resnet18"]
    assert config_from_args(build_parser().parse_args(base)).fused_views is False
    config = config_from_args(build_parser().parse_args([*base, "--fused-views"]))
    assert config.fused_views is True

    class Built(Exception):
        pass

    def record(*args, **kwargs):
        raise Built(kwargs)

    monkeypatch.setattr(coupled, "CoupledViewDataset", record)
    method = coupled.CoupledViewMethod.__new__(coupled.CoupledViewMethod)
    method.run = SimpleNamespace(train_paths=image_files, config=config)
    with pytest.raises(Built) as built:
        method.epoch_batches(0, torch.Generator())
    assert built.value.args[0]["fused"] is True


# ---------------------------------------------------------------- batches rendered in place


@pytest.mark.parametrize(
    "options",
    [
        {"partners": True},
        {"partners": False},
        {"partners": True, "coupled": False},
        {"partners": False, "coupled": False},
        {"partners": True, "fused": True},
    ],
)
def test_batch_rendered_in_place_equals_the_stacked_batch(image_files, options):
    ds = CoupledViewDataset(image_files, 16, 32, 3, 5, **options)
    items = [2, 0, 2, 1]
    stacked = default_collate([ds[i] for i in items])
    for batch in (ds[items], ds.batch(items)):
        assert len(batch) == len(stacked)
        for got, expected in zip(batch, stacked, strict=True):
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert got.stride() == expected.stride()  # the same (channels-last) layout
            assert torch.equal(got, expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_loader_arguments_give_the_default_loader_batches(image_files, workers):
    ds = _partner_dataset(image_files)
    batches = [[0, 2], [1, 1, 0], [(2, 8), (0, 8)]]  # the last at another student size
    expected = list(DataLoader(ds, batch_sampler=batches))
    got = list(DataLoader(ds, **batch_loader_arguments(batches), num_workers=workers))
    assert len(got) == len(expected)
    for batch, reference in zip(got, expected, strict=True):
        assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(batch, reference, strict=True))
    assert got[2][0].shape[-1] == 8


def test_batch_memory_is_recycled_only_once_the_batch_is_freed(image_files):
    ds = CoupledViewDataset(image_files, 384, 512, 3, 5, partners=True)  # buffers above one huge page
    first = ds.batch([0, 1])
    expected = [t.clone() for t in first]
    second = ds.batch([2, 0])  # first is alive: written elsewhere, first untouched
    assert ds._pool.created == 8
    assert all(torch.equal(a, b) for a, b in zip(first, expected, strict=True))
    addresses = {t.data_ptr() for t in first[:4]}
    assert addresses.isdisjoint({t.data_ptr() for t in second[:4]})
    del first, expected
    third = ds.batch([1, 2])  # first's memory is free again: reused, nothing created
    assert {t.data_ptr() for t in third[:4]} == addresses and ds._pool.created == 8
    assert all(torch.equal(a, b) for a, b in zip(third, ds.batch([1, 2]), strict=True))
    # a spawned DataLoader worker gets the dataset pickled, without this process's pool
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._pool is None and ds._pool is not None
    assert all(torch.equal(a, b) for a, b in zip(copy.batch([1, 2]), third, strict=True))


def test_batch_bad_inputs(image_files):
    ds = _partner_dataset(image_files)
    with pytest.raises(ValueError, match="at least one item"):
        ds.batch([])
    with pytest.raises(ValueError, match="share one student size"):
        ds.batch([(0, 8), 1])
    with pytest.raises(IndexError, match="out of range"):
        ds[[0, 7]]


def test_mix_partner_views_into_pool_memory_equals_fresh_memory():
    g = torch.Generator().manual_seed(3)
    s, t = _views(2, 2, 512, torch.uint8, g, True), _views(2, 2, 1024, torch.uint8, g, True)
    ps, pt = _views(2, 2, 512, torch.uint8, g, True), _views(2, 2, 1024, torch.uint8, g, True)
    lam = torch.rand(2, 2, generator=g)
    pool = BufferPool()
    fresh = mix_partner_views(s, t, ps, pt, lam)
    for _ in range(2):  # the second call recycles the first's memory
        pooled = mix_partner_views(s, t, ps, pt, lam, pool=pool)
        assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(pooled, fresh, strict=True))
        del pooled
    assert pool.created == 2


def test_mixup_views_into_pool_memory_equals_fresh_memory():
    g = torch.Generator().manual_seed(4)
    s, t = _views(3, 2, 512, torch.uint8, g, True), _views(3, 2, 1024, torch.uint8, g, True)
    fresh = mixup_views(s, t, torch.Generator().manual_seed(9))
    pool = BufferPool()
    for _ in range(2):
        pooled = mixup_views(s, t, torch.Generator().manual_seed(9), pool=pool)
        assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(pooled, fresh, strict=True))
        del pooled
    assert pool.created == 2
