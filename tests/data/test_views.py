"""Coupled views: sampling rule, rendering, reproducibility, mixup, and the pipeline benchmark."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from raml.bench.pipeline import main as bench_main
from raml.bench.pipeline import make_synthetic_jpegs, run_pipeline_benchmark
from raml.data.images import ImageLoadError
from raml.data.views import (
    CoupledViewDataset,
    ViewParams,
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
    """Slow reference: the four operations one after another in float64, clipped once at the end."""
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
def test_jitter_matches_sequential_float_reference(order):
    img = _smooth_image(32, 32, seed=3)
    view = _plain(img, brightness=1.2, contrast=0.7, saturation=1.3, hue=0.08, order=order)
    _, teacher = render_coupled_views(img, [view], 16, 32)
    expected = _sequential_jitter(np.asarray(img), view)
    got = teacher[0].permute(1, 2, 0).numpy().astype(np.float64)
    assert np.abs(got - expected).max() <= 1.0  # PIL rounds to the nearest level


def test_jitter_commutes_with_the_resize():
    # A crop larger than the DR view is jittered after the resize, a smaller one before: same result.
    img = _smooth_image(48, 48, seed=5)
    view = _plain(img, brightness=0.8, contrast=1.3, saturation=0.7, hue=-0.06, order=(2, 0, 3, 1))
    _, teacher = render_coupled_views(img, [view], 16, 32)
    got = teacher[0].permute(1, 2, 0).numpy().astype(np.float64)
    resized = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(got - _sequential_jitter(resized, view)).max() <= 1.0
    jitter_first = Image.fromarray(np.rint(_sequential_jitter(np.asarray(img), view)).astype(np.uint8))
    other_order = np.asarray(jitter_first.resize((32, 32), Image.Resampling.BILINEAR)).astype(np.float64)
    assert np.abs(got - other_order).mean() < 0.5 and np.abs(got - other_order).max() <= 3


def test_hue_direction_and_grey_invariance():
    # A positive shift moves red towards yellow (green rises), as HSV hue does; greys stay grey.
    img = Image.new("RGB", (8, 8), (200, 40, 40))
    img.paste((128, 128, 128), (0, 0, 4, 8))
    _, teacher = render_coupled_views(img, [_plain(img, hue=0.05)], 8, 8)
    red, grey = teacher[0, :, 0, 7].tolist(), teacher[0, :, 0, 0].tolist()
    assert red[1] > 40 + 20 and red[2] < 40 and grey == [128, 128, 128]


def test_student_is_the_teacher_resized():
    img = _smooth_image(200, 150, seed=4)
    params = [sample_view_params(200, 150, torch.Generator().manual_seed(s)) for s in range(6)]
    student, teacher = render_coupled_views(img, params, 32, 64)
    # Independent resize (torch, antialiased bilinear) of the teacher view, in [0, 1] units.
    resized = F.interpolate(teacher.float() / 255, size=(32, 32), mode="bilinear", antialias=True)
    same = (student.float() / 255 - resized).abs().mean(dim=(1, 2, 3))
    other = (student.float() / 255 - resized.roll(1, dims=0)).abs().mean(dim=(1, 2, 3))
    assert same.max() < 0.02
    assert other.min() > 5 * same.max()


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


# ---------------------------------------------------------------- benchmark


def test_pipeline_benchmark_runs(tmp_path):
    paths = make_synthetic_jpegs(tmp_path / "imgs", 2, width=40, height=30)
    report = run_pipeline_benchmark(paths, 16, 32, pos_num=2, batch_size=2, workers=0, batches=1)
    for key in (
        "coupled_views_per_s",
        "baseline_coupled_views_per_s",
        "speedup",
        "settings",
        "torch_threads",
    ):
        assert key in report
    assert report["ours"]["coupled_views"] == 4 and report["baseline"]["coupled_views"] == 4
    out = tmp_path / "report.json"
    argv = ["--images", str(tmp_path / "imgs"), "--image-size", "16", "--teacher-image-size", "32"]
    argv += ["--pos-num", "2", "--batch-size", "2", "--batches", "1", "--json", str(out)]
    assert bench_main(argv) == 0
    assert json.loads(out.read_text())["settings"]["batch_size"] == 2


def test_pipeline_benchmark_bad_images_folder(tmp_path):
    with pytest.raises(SystemExit, match="not a folder"):
        bench_main(["--images", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="No image files"):
        bench_main(["--images", str(tmp_path)])
    with pytest.raises(SystemExit, match="--batches must be >= 1"):
        bench_main(["--batches", "0"])
