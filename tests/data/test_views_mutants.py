"""Tests written for the survivors of mutation testing of raml.data.views (scripts/mutate.py views).

Each test asserts behaviour against a plain computation written here, so that a one-line change of the module
(a mutant) that keeps the shapes but changes a number fails it.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from raml.data import views
from raml.data.images import load_image
from raml.data.views import (
    CoupledViewDataset,
    ViewParams,
    color_twist_matrix,
    mix_partner_views,
    mixup_views,
    render_coupled_views,
    sample_view_params,
)


def test_mean_rgb_is_the_plain_mean_of_the_pixels() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    got = views._mean_rgb(Image.fromarray(pixels))
    assert np.allclose(got, pixels.reshape(-1, 3).astype(np.float64).mean(0), rtol=0, atol=1e-12)


def test_hue_rotation_by_a_third_of_a_turn_permutes_red_green_blue() -> None:
    """A rotation by 120 degrees about the grey axis maps red to green and green to blue (HSV's direction)."""
    third = views._hue_rotation(1.0 / 3.0)
    assert np.allclose(third @ [255.0, 0.0, 0.0], [0.0, 255.0, 0.0], atol=1e-9)
    assert np.allclose(third @ [0.0, 255.0, 0.0], [0.0, 0.0, 255.0], atol=1e-9)
    assert np.allclose(views._hue_rotation(0.0), np.eye(3), atol=1e-12)
    grey = np.array([80.0, 80.0, 80.0])
    assert np.allclose(views._hue_rotation(0.07) @ grey, grey, atol=1e-9)


def test_crop_box_is_left_upper_right_lower() -> None:
    view = ViewParams(top=3, left=5, height=7, width=11, flip=False)
    assert view.box == (5, 3, 16, 10)


def test_twist_of_brightness_then_contrast_against_a_plain_pixel_computation() -> None:
    """Brightness first (x -> b x), then contrast against the mean grey of the brightened image."""
    view = ViewParams(top=0, left=0, height=1, width=1, flip=False, brightness=1.2, contrast=0.7, order=(0, 1, 2, 3))
    mean = [100.0, 50.0, 20.0]
    x = np.array([30.0, 60.0, 90.0])
    brightened = 1.2 * x
    grey = 0.299 * 1.2 * mean[0] + 0.587 * 1.2 * mean[1] + 0.114 * 1.2 * mean[2]
    expected = 0.7 * brightened + 0.3 * grey
    twist = color_twist_matrix(view, mean)
    assert np.allclose(twist[:, :3] @ x + twist[:, 3], expected, atol=1e-9)


# ------------------------------------------------------------------------------------------ helpers
def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Pixel noise (not smooth), so that any change of crop, order of operations or rounding shows."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _files(tmp_path, sizes: list[tuple[int, int]]) -> list:
    paths = []
    for k, (w, h) in enumerate(sizes):
        paths.append(tmp_path / f"m{k}.png")
        _noise_image(w, h, seed=20 + k).save(paths[-1])
    return paths


def _channels_last(views_: torch.Tensor) -> torch.Tensor:
    """``(B, P, 3, S, S)`` views with each view's channels in the last place in memory (as the dataset gives them)."""
    return views_.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _message(text: str) -> str:
    """A pytest ``match`` pattern for the whole message, word for word."""
    return "^" + re.escape(text) + "$"


# ------------------------------------------------------------------------------------------ sampling
def test_sampler_refuses_a_boolean_width_or_a_zero_height_and_names_the_generator_type() -> None:
    g = torch.Generator()
    with pytest.raises(ValueError, match=_message("width and height must be integers, got True x 10.")):
        sample_view_params(True, 10, g)
    with pytest.raises(ValueError, match=_message("The image must have a positive size, got 10 x 0 pixels.")):
        sample_view_params(10, 0, g)
    with pytest.raises(TypeError, match=_message("generator must be a torch.Generator, got str.")):
        sample_view_params(10, 10, "seed")


def test_crops_on_thin_images_are_torchvision_s_for_many_seeds() -> None:
    """One- and two-pixel wide (or high) images, where a try whose side rounds to 1 or to the full side is
    accepted (torchvision's ``0 < w <= width``), checked against torchvision's own RandomResizedCrop."""
    from torchvision import transforms

    rrc = transforms.RandomResizedCrop(8, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    for width, height in ((1, 3), (3, 1), (2, 3), (3, 2), (1, 1)):
        img = Image.new("RGB", (width, height))
        for seed in range(60):
            got = views._sample_crop(width, height, torch.Generator().manual_seed(seed))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                expected = rrc.get_params(img, rrc.scale, rrc.ratio)
            assert got == tuple(expected), (width, height, seed)


# ------------------------------------------------------------------------------------------ sizes and checks
def test_render_accepts_one_pixel_views_and_refuses_a_boolean_size() -> None:
    img = _noise_image(9, 7)
    view = ViewParams(top=2, left=3, height=1, width=1, flip=False)
    student, teacher = render_coupled_views(img, [view], 1, 1)
    pixel = np.array(img)[2, 3]
    assert torch.equal(teacher[0, :, 0, 0], torch.from_numpy(pixel)) and torch.equal(student, teacher)
    with pytest.raises(
        ValueError, match=_message("student_size must be a positive integer number of pixels, got True.")
    ):
        render_coupled_views(img, [view], True, 4)
    with pytest.raises(ValueError, match=_message("teacher_size must be a positive integer number of pixels, got 0.")):
        render_coupled_views(img, [view], 4, 0)
    with pytest.raises(ValueError) as error:
        render_coupled_views(img, [view], 5, 4)
    assert str(error.value) == (
        "student_size (5) must not exceed teacher_size (4): the student view is the small-resolution rendering of "
        "the teacher view (the teacher sees the large resolution)."
    )


@pytest.mark.parametrize(
    ("box", "ok"),
    [
        ((0, 0, 1, 9), True),  # one row (top, left, height, width)
        ((0, 0, 7, 1), True),  # one column
        ((0, 0, 0, 9), False),  # no rows
        ((0, 0, 7, 0), False),  # no columns
        ((0, -1, 7, 5), False),  # left of the image only
        ((-1, 0, 5, 9), False),  # above the image only
        ((0, 5, 7, 5), False),  # right of the image only
        ((3, 0, 5, 9), False),  # below the image only
    ],
)
def test_each_side_of_the_crop_box_is_checked_on_its_own(box, ok) -> None:
    img = _noise_image(9, 7)
    top, left, height, width = box
    view = ViewParams(top=top, left=left, height=height, width=width, flip=False)
    if ok:
        student, teacher = render_coupled_views(img, [view], 2, 3)
        assert student.shape == (1, 3, 2, 2) and teacher.shape == (1, 3, 3, 3)
        return
    with pytest.raises(ValueError) as error:
        render_coupled_views(img, [view], 2, 3)
    assert str(error.value) == (
        f"params[0] has crop box {view.box} outside the 9 x 7 image; draw the views with "
        "sample_view_params(img.width, img.height, generator) for this image."
    )


def test_render_error_messages_word_for_word() -> None:
    img = _noise_image(9, 7)
    view = ViewParams(top=0, left=0, height=7, width=9, flip=False)
    with pytest.raises(
        TypeError, match=_message("img must be a PIL.Image.Image, got list; decode it with load_image.")
    ):
        render_coupled_views([], [view], 2, 4)
    with pytest.raises(TypeError, match=_message("fused must be a bool, got int.")):
        render_coupled_views(img, [view], 2, 4, fused=1)
    with pytest.raises(
        ValueError, match=_message("params is empty: pass at least one ViewParams (one per coupled view).")
    ):
        render_coupled_views(img, [], 2, 4)
    with pytest.raises(TypeError, match=_message("params[0] must be a ViewParams, got tuple.")):
        render_coupled_views(img, [(0, 0, 7, 9)], 2, 4)


# ------------------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("field", ["brightness", "contrast", "saturation"])
def test_a_single_jitter_factor_of_two_changes_the_view(field) -> None:
    img = _noise_image(12, 10)
    plain = ViewParams(top=0, left=0, height=10, width=12, flip=False)
    jittered = ViewParams(top=0, left=0, height=10, width=12, flip=False, **{field: 2.0})
    _, a = render_coupled_views(img, [plain], 4, 8)
    _, b = render_coupled_views(img, [jittered], 4, 8)
    assert (a.int() - b.int()).abs().max() > 10


def test_the_torch_backend_is_the_torch_resize_of_the_crop_to_the_bit() -> None:
    img = _noise_image(23, 17)
    view = ViewParams(top=2, left=3, height=13, width=15, flip=False)
    student, teacher = render_coupled_views(img, [view], 5, 9, backend="torch")
    crop = torch.from_numpy(np.array(img))[2:15, 3:18]
    expected_teacher = torch.nn.functional.interpolate(
        crop.permute(2, 0, 1)[None].float(), size=(9, 9), mode="bilinear", antialias=True
    )
    # torch's uint8 kernel computes in fixed point, within a grey level of the float filter; PIL's resize
    # (the other backend) differs from it somewhere
    assert (teacher[0].float() - expected_teacher[0]).abs().max() <= 1.0
    pil = np.asarray(img.crop(view.box).resize((9, 9), Image.Resampling.BILINEAR))
    assert not np.array_equal(teacher[0].permute(1, 2, 0).numpy(), pil)
    assert torch.equal(teacher[0].permute(1, 2, 0), views._resize_uint8(crop, 9))
    assert torch.equal(student[0].permute(1, 2, 0), views._resize_uint8(crop, 5))


def _fused_by_hand(img: Image.Image, view: ViewParams, small: int, big: int) -> tuple[np.ndarray, np.ndarray]:
    """The fused rendering on the torch backend, step by step: the colour twist (one matrix, PIL's colour
    conversion) on whichever of the flipped crop and the big view has fewer pixels, the big view the torch
    resize of the crop, the small view the torch resize of the big one."""
    crop = img.crop(view.box)
    if view.flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    def twist(picture: Image.Image) -> Image.Image:
        matrix = color_twist_matrix(view, np.asarray(picture, dtype=np.float64).reshape(-1, 3).mean(0))
        return picture.convert("RGB", tuple(float(v) for v in matrix.ravel()))

    if view.width * view.height <= big * big:
        crop = twist(crop)
    big_view = views._resize_uint8(torch.from_numpy(np.array(crop)), big)
    if view.width * view.height > big * big:
        big_view = torch.from_numpy(np.array(twist(Image.fromarray(big_view.contiguous().numpy()))))
    small_view = views._resize_uint8(big_view, small) if small != big else big_view
    return small_view.numpy(), big_view.numpy()


@pytest.mark.parametrize(
    ("box", "small", "big"),
    [
        ((1, 2, 5, 6), 4, 8),  # a crop smaller than the big view: twisted first
        ((0, 0, 24, 30), 4, 8),  # larger: twisted after the resize
        ((3, 1, 4, 16), 4, 8),  # as many pixels as the big view (64): twisted first
        ((1, 2, 5, 6), 8, 8),  # one size: the small view is the big one
    ],
)
def test_fused_torch_rendering_twists_the_smaller_of_crop_and_view(box, small, big) -> None:
    img = _noise_image(31, 26, seed=3)
    top, left, height, width = box
    view = ViewParams(top, left, height, width, flip=True, brightness=1.3, contrast=0.6, saturation=1.4, hue=0.05)
    student, teacher = render_coupled_views(img, [view], small, big, backend="torch", fused=True)
    expected_small, expected_big = _fused_by_hand(img, view, small, big)
    assert np.array_equal(teacher[0].permute(1, 2, 0).numpy(), expected_big)
    assert np.array_equal(student[0].permute(1, 2, 0).numpy(), expected_small)


# ------------------------------------------------------------------------------------------ the dataset
def test_dataset_arguments_word_for_word(tmp_path) -> None:
    paths = _files(tmp_path, [(20, 16)])
    with pytest.raises(TypeError) as error:
        CoupledViewDataset(paths[0], 4, 8, 2, 0)
    assert str(error.value) == "paths must be a sequence of image files, got a single path; wrap it in a list."
    with pytest.raises(ValueError) as error:
        CoupledViewDataset([], 4, 8, 2, 0)
    assert str(error.value) == "paths is empty: CoupledViewDataset needs at least one image file."
    with pytest.raises(ValueError, match=_message("student_size must be a positive integer number of pixels, got 0.")):
        CoupledViewDataset(paths, 0, 8, 2, 0)
    with pytest.raises(ValueError, match=_message("teacher_size must be a positive integer number of pixels, got 0.")):
        CoupledViewDataset(paths, 4, 0, 2, 0)
    with pytest.raises(ValueError) as error:
        CoupledViewDataset(paths, 9, 8, 2, 0)
    assert str(error.value) == (
        "student_size (9) must not exceed teacher_size (8); pass --image-size QR smaller than --teacher-image-size DR."
    )
    for name, value in (("pos_num", True), ("seed", True)):
        arguments = {"pos_num": 2, "seed": 0, name: value}
        with pytest.raises(ValueError, match=f"^{name} must be a"):
            CoupledViewDataset(paths, 4, 8, **arguments)
    for name in ("partners", "coupled", "fused"):
        with pytest.raises(TypeError, match=_message(f"{name} must be a bool, got int.")):
            CoupledViewDataset(paths, 4, 8, 2, 0, **{name: 1})
    with pytest.raises(ValueError, match="^alpha must be a positive finite number"):
        CoupledViewDataset(paths, 4, 8, 2, 0, alpha=True)
    dataset = CoupledViewDataset(paths, 8, 8, 1, 0)  # QR = DR and a single view are allowed
    assert dataset.alpha == 0.2  # the documented default (the reference's Beta(0.2, 0.2))
    student, teacher, _ = dataset[-1]  # the first index from the end
    assert student.shape == (1, 3, 8, 8) and torch.equal(student, teacher)
    with pytest.raises(ValueError, match=_message("epoch must be a non-negative integer, got True.")):
        dataset.set_epoch(True)


def test_item_seeds_are_the_seed_sequence_of_seed_epoch_and_index(tmp_path) -> None:
    dataset = CoupledViewDataset(_files(tmp_path, [(20, 16)] * 3), 4, 8, 2, seed=11)
    dataset.set_epoch(4)
    for index in range(3):
        words = np.random.SeedSequence([11, 4, index]).generate_state(2, dtype=np.uint32)
        assert dataset.generator_for(index).initial_seed() == int(words[0]) * 2**32 + int(words[1])


def test_partner_draws_seed_every_view_and_lambda_from_the_whole_62_bit_range(tmp_path) -> None:
    """Over many items, the view seeds and the weights are all distinct (a narrow seed range would repeat them),
    and every weight is a float32 value (the item's tensor is float32)."""
    # alpha = 1: uniform weights (Beta(0.2, 0.2) puts so much mass at 0 and 1 that float32 values repeat)
    dataset = CoupledViewDataset(_files(tmp_path, [(20, 16)] * 200), 4, 8, 2, seed=0, partners=True, alpha=1.0)
    seeds, lams = [], []
    for index in range(len(dataset)):
        draws = dataset.partner_draws(index)
        seeds += draws.view_seeds
        lams += draws.lam
        assert all(float(np.float32(lam)) == lam for lam in draws.lam)
    assert len(set(seeds)) == len(seeds) and max(seeds) > 2**61
    assert len(set(lams)) == len(lams)


def test_partner_items_refuse_a_student_size_above_the_teacher_size(tmp_path) -> None:
    dataset = CoupledViewDataset(_files(tmp_path, [(20, 16)] * 2), 4, 8, 2, seed=0, partners=True)
    student = dataset[(0, 6)][0]
    assert student.shape == (2, 3, 6, 6)
    with pytest.raises(ValueError, match="must not exceed teacher_size"):
        dataset[(0, 9)]


@pytest.mark.parametrize("fused", [False, True])
def test_uncoupled_views_draw_the_teacher_s_views_after_the_student_s(tmp_path, fused) -> None:
    """--uncoupled-views without partners: the item's generator draws the P student views, then the P teacher
    views; each is rendered at its own resolution from its own draws (here at the default and at another
    student size)."""
    paths = _files(tmp_path, [(40, 30), (26, 34)])
    dataset = CoupledViewDataset(paths, 8, 16, 3, seed=2, coupled=False, fused=fused)
    for index in range(len(paths)):
        img = load_image(paths[index])
        generator = dataset.generator_for(index)
        params = [sample_view_params(img.width, img.height, generator) for _ in range(3)]
        teacher_params = [sample_view_params(img.width, img.height, generator) for _ in range(3)]
        for size in (8, 12):
            student, teacher, got_index = dataset[(index, size)] if size != 8 else dataset[index]
            expected_student, _ = render_coupled_views(img, params, size, 16, backend="pil", fused=fused)
            _, expected_teacher = render_coupled_views(img, teacher_params, size, 16, backend="pil", fused=fused)
            assert got_index == index
            assert torch.equal(student, expected_student) and torch.equal(teacher, expected_teacher)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("backend", ["pil", "torch"])
@pytest.mark.parametrize("student_size", [8, 16])
def test_a_side_not_asked_for_is_not_rendered(fused, backend, student_size) -> None:
    """``write`` = (student, teacher): the side asked for has the pixels of a render of both; the reference
    renderer leaves the other untouched (the fused one needs the DR view for the QR one, so it writes it)."""
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(4)
    params = [sample_view_params(img.width, img.height, generator) for _ in range(3)]
    both = [np.zeros((3, size, size, 3), np.uint8) for size in (student_size, 16)]
    views._render_into(img, params, *both, range(3), backend, fused)
    for write in [(True, False), (False, True)]:
        student, teacher = (np.full((3, size, size, 3), 7, np.uint8) for size in (student_size, 16))
        views._render_into(img, params, student, teacher, range(3), backend, fused, write=write)
        for wanted, got, expected in zip(write, (student, teacher), both):
            if wanted:
                np.testing.assert_array_equal(got, expected)
            elif not (fused and got is teacher):
                assert (got == 7).all(), f"write={write} rendered a side not asked for"
    with pytest.raises(ValueError, match="write must ask for"):
        views._render_into(img, params, *both, range(3), backend, fused, write=(False, False))


def test_teacher_seed_is_the_seed_sequence_of_the_view_seed_and_one() -> None:
    for view_seed in (0, 1, 12345, 2**62 - 1):
        words = np.random.SeedSequence([view_seed, 1]).generate_state(2, dtype=np.uint32)
        assert views._teacher_seed(view_seed) == int(words[0]) * 2**32 + int(words[1])


@pytest.mark.parametrize("fused", [False, True])
def test_uncoupled_partner_views_draw_the_teacher_from_the_teacher_seed(tmp_path, fused) -> None:
    """--uncoupled-views with partners: the student's view (and partner view) from the view's seed, the
    teacher's from the seed derived from it, on the image's (the partner's) own size."""
    paths = _files(tmp_path, [(40, 30), (26, 34), (33, 33)])
    dataset = CoupledViewDataset(paths, 8, 16, 4, seed=5, partners=True, coupled=False, fused=fused)

    def render(img: Image.Image, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = sample_view_params(img.width, img.height, torch.Generator().manual_seed(seed))
        teacher_seed = int(
            (lambda w: int(w[0]) * 2**32 + int(w[1]))(
                np.random.SeedSequence([seed, 1]).generate_state(2, dtype=np.uint32)
            )
        )
        teacher_view = sample_view_params(img.width, img.height, torch.Generator().manual_seed(teacher_seed))
        student, _ = render_coupled_views(img, [view], 8, 16, backend="torch", fused=fused)
        _, teacher = render_coupled_views(img, [teacher_view], 8, 16, backend="torch", fused=fused)
        return student[0], teacher[0]

    others = 0
    for index in range(len(paths)):
        student, teacher, partner_student, partner_teacher, _, _ = dataset[index]
        draws = dataset.partner_draws(index)
        img = load_image(paths[index])
        for slot, (seed, partner) in enumerate(zip(draws.view_seeds, draws.partners, strict=True)):
            s, t = render(img, seed)
            assert torch.equal(student[slot], s) and torch.equal(teacher[slot], t)
            ps, pt = render(load_image(paths[partner]), seed)
            assert torch.equal(partner_student[slot], ps) and torch.equal(partner_teacher[slot], pt)
            others += partner != index
    assert others >= 3


# ------------------------------------------------------------------------------------------ mixing
def test_mix_partner_views_error_messages_word_for_word() -> None:
    s, t = torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 2, 3, 8, 8)
    lam = torch.full((1, 2), 0.5)
    with pytest.raises(TypeError, match=_message("student must be a torch.Tensor (B, P, 3, S, S), got list.")):
        mix_partner_views([], t, s, t, lam)
    with pytest.raises(ValueError, match=r"^teacher must have shape \(B, P, C, S, S\)"):
        mix_partner_views(s, t[0], s, t, lam)
    with pytest.raises(
        ValueError, match=_message("partner_student (1, 2, 3, 5, 5) must have the shape of student (1, 2, 3, 4, 4).")
    ):
        mix_partner_views(s, t, torch.zeros(1, 2, 3, 5, 5), t, lam)
    with pytest.raises(ValueError) as error:
        mix_partner_views(s, t[:, :1], s, t[:, :1], lam)
    assert str(error.value) == (
        "student (1, 2, 3, 4, 4) and teacher (1, 1, 3, 8, 8) must agree on (B, P, C): they are the same views at "
        "two resolutions."
    )
    with pytest.raises(TypeError, match=_message("lam must be a floating-point torch.Tensor (B, P), got torch.int64.")):
        mix_partner_views(s, t, s, t, torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(
        TypeError, match=_message("lam must be a floating-point torch.Tensor (B, P), got <class 'list'>.")
    ):
        mix_partner_views(s, t, s, t, [[0.5, 0.5]])
    with pytest.raises(
        ValueError, match=_message("lam must lie in [0, 1] (a Beta draw); got values outside it or NaN.")
    ):
        mix_partner_views(s, t, s, t, torch.full((1, 2), 2.0))
    with pytest.raises(
        ValueError, match=_message("partner_student is on meta but its view is on cpu; move the pair together.")
    ):
        mix_partner_views(s, t, s.to("meta"), t, lam)


def test_each_resolution_is_mixed_on_its_own_device_with_its_own_kernel(monkeypatch) -> None:
    """The teacher's views may live on another device than the student's: each pair is checked against its
    own view, and mixed there, per view on the CPU, batched elsewhere (the meta device stands in for a GPU)."""
    calls = []
    per_view, batched = views._lerp_per_view, views._lerp_batched
    monkeypatch.setattr(
        views, "_lerp_per_view", lambda v, *a: calls.append(("per_view", v.device.type)) or per_view(v, *a)
    )
    monkeypatch.setattr(
        views, "_lerp_batched", lambda v, *a: calls.append(("batched", v.device.type)) or batched(v, *a)
    )
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 256, (1, 2, 3, 4, 4), dtype=torch.uint8, generator=g)
    ps = torch.randint(0, 256, (1, 2, 3, 4, 4), dtype=torch.uint8, generator=g)
    t, pt = (
        torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8, device="meta"),
        torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8, device="meta"),
    )
    lam = torch.tensor([[0.25, 0.75]])
    mixed_s, mixed_t = mix_partner_views(s, t, ps, pt, lam)
    assert calls == [("per_view", "cpu"), ("batched", "meta")]
    assert mixed_t.device.type == "meta" and mixed_t.shape == t.shape and mixed_t.dtype == torch.float32
    expected = (
        lam.double()[:, :, None, None, None] * s.double() + (1 - lam.double()[:, :, None, None, None]) * ps.double()
    )
    assert torch.allclose(mixed_s.double(), expected, atol=1e-4, rtol=0)


def test_uint8_views_of_different_layouts_are_mixed_by_the_plain_path() -> None:
    """A partner in another memory layout, or a view that is not dense, cannot go through the one-pass kernel
    (it needs one C-contiguous layout for all three): the plain copy-and-lerp path gives the same pixels."""
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 256, (2, 2, 3, 6, 6), dtype=torch.uint8, generator=g)
    ps = torch.randint(0, 256, (2, 2, 3, 6, 6), dtype=torch.uint8, generator=g)
    wide = torch.randint(0, 256, (2, 2, 3, 6, 12), dtype=torch.uint8, generator=g)
    lam = torch.tensor([[0.2, 0.9], [0.5, 0.0]])
    w = lam.double()[:, :, None, None, None]
    for view, partner in (
        (s, _channels_last(ps)),  # partner channels-last
        (_channels_last(s), ps),  # view channels-last
        (wide[..., ::2], ps),  # the view not dense
        (s, wide[..., 1::2]),  # the partner not dense
    ):
        mixed, _ = mix_partner_views(view, view, partner, partner, lam)
        assert torch.allclose(mixed.double(), w * view.double() + (1 - w) * partner.double(), atol=1e-4, rtol=0)


def test_memory_order_and_dense_layout() -> None:
    x = torch.zeros(3, 4, 5)
    channels_last = x.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # (3, 4, 5), channels in the last place
    assert views._memory_order(x) == [0, 1, 2]
    assert views._memory_order(channels_last) == [1, 2, 0]
    assert views._memory_order(x.transpose(0, 2)) == [2, 1, 0]
    assert views._same_dense_layout(x) and views._same_dense_layout(channels_last)
    assert views._same_dense_layout(x, x.clone(), torch.ones(3, 4, 5))
    assert not views._same_dense_layout(x, channels_last) and not views._same_dense_layout(channels_last, x)
    assert not views._same_dense_layout(x, torch.zeros(3, 4, 6))
    sliced = torch.zeros(3, 4, 10)[..., ::2]
    assert not views._same_dense_layout(sliced) and not views._same_dense_layout(sliced, sliced)


def test_mixup_views_error_messages_word_for_word() -> None:
    g = torch.Generator()
    s, t = torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 2, 3, 8, 8)
    with pytest.raises(TypeError, match=_message("student must be a torch.Tensor (B, P, 3, S, S), got list.")):
        mixup_views([], t, g)
    with pytest.raises(TypeError, match=_message("teacher must be a torch.Tensor (B, P, 3, S, S), got list.")):
        mixup_views(s, [], g)
    with pytest.raises(TypeError) as error:
        mixup_views(s.long(), t.long(), g)
    assert str(error.value) == (
        "student must be a floating-point or uint8 tensor of pixels, got torch.int64; convert it with .float() "
        "before mixing."
    )
    with pytest.raises(ValueError) as error:
        mixup_views(s, t[:, :1], g)
    assert str(error.value) == (
        "student (1, 2, 3, 4, 4) and teacher (1, 1, 3, 8, 8) must agree on (B, P, C): they are the same views at "
        "two resolutions."
    )
    with pytest.raises(
        TypeError,
        match=_message("generator must be a CPU torch.Generator (the draws are made on the CPU, then moved)."),
    ):
        mixup_views(s, t, None)


@pytest.mark.parametrize("views_per_image", [2, 3])
def test_mixup_of_one_image_mixes_each_view_with_another_of_its_views(views_per_image) -> None:
    """B = 1: view i becomes lam x_i + (1 - lam) x_j with j != i, the same lam and j at both resolutions."""
    base = torch.tensor([0.0, 1.0, 2.0])[:views_per_image] * 100
    student = base.view(1, -1, 1, 1, 1).expand(1, views_per_image, 3, 2, 2).clone()
    teacher = base.view(1, -1, 1, 1, 1).expand(1, views_per_image, 3, 4, 4).clone()
    for seed in range(6):
        mixed_s, mixed_t = mixup_views(student, teacher, torch.Generator().manual_seed(seed))
        for i in range(views_per_image):
            value = float(mixed_s[0, i, 0, 0, 0])
            assert torch.all(mixed_s[0, i] == value) and torch.allclose(
                mixed_t[0, i], torch.full_like(mixed_t[0, i], value)
            )
            # value = lam * base[i] + (1 - lam) * base[j] for one j != i and lam in [0, 1]
            fits = [
                j for j in range(views_per_image)
                if j != i and min(base[i], base[j]) - 1e-3 <= value <= max(base[i], base[j]) + 1e-3
            ]  # fmt: skip
            assert fits, (seed, i, value)


def test_mixup_weights_come_from_the_whole_62_bit_seed_range() -> None:
    """Two images of one view each: out[0] = lam x0 + (1 - lam) x1 shows lam; over 200 generators the weights
    are all distinct (a seed range of a few hundred values would repeat them)."""
    student = torch.stack([torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)])
    teacher = torch.stack([torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)])
    lams = set()
    for seed in range(200):
        mixed_s, _ = mixup_views(student, teacher, torch.Generator().manual_seed(seed), alpha=1.0)
        lams.add(1.0 - float(mixed_s[0, 0, 0, 0, 0]))
    assert len(lams) == 200


def test_the_dataset_renders_with_its_backend(tmp_path) -> None:
    """backend="torch" without partners: the items are the torch backend's rendering (not PIL's)."""
    paths = _files(tmp_path, [(40, 30)])
    img = load_image(paths[0])
    for backend in ("torch", "pil"):
        dataset = CoupledViewDataset(paths, 8, 16, 3, seed=2, backend=backend)
        generator = dataset.generator_for(0)
        params = [sample_view_params(img.width, img.height, generator) for _ in range(3)]
        student, teacher, _ = dataset[0]
        expected = render_coupled_views(img, params, 8, 16, backend=backend)
        other = render_coupled_views(img, params, 8, 16, backend="pil" if backend == "torch" else "torch")
        assert torch.equal(student, expected[0]) and torch.equal(teacher, expected[1])
        assert not torch.equal(teacher, other[1])


def test_dense_uint8_views_of_one_layout_are_mixed_by_the_one_pass_kernel(monkeypatch) -> None:
    """uint8 views, partners and output of one dense layout (contiguous or channels-last) go through the compiled
    one-pass kernel, view by view; floating-point views through torch.lerp."""
    calls = []
    kernel = views.lerp_uint8_into
    monkeypatch.setattr(views, "lerp_uint8_into", lambda *a: calls.append(a[0].shape) or kernel(*a))
    g = torch.Generator().manual_seed(2)
    s = torch.randint(0, 256, (2, 3, 3, 4, 4), dtype=torch.uint8, generator=g)
    ps = torch.randint(0, 256, (2, 3, 3, 4, 4), dtype=torch.uint8, generator=g)
    lam = torch.rand(2, 3, generator=g)
    w = lam.double()[:, :, None, None, None]
    for view, partner in ((s, ps), (_channels_last(s), _channels_last(ps))):
        calls.clear()
        mixed, _ = mix_partner_views(view, view, partner, partner, lam)
        assert len(calls) == 2 * 6  # both resolutions, each of the 6 views
        assert torch.allclose(mixed.double(), w * s.double() + (1 - w) * ps.double(), atol=1e-4, rtol=0)
    calls.clear()
    mix_partner_views(s.float(), s.float(), ps.float(), ps.float(), lam)
    assert calls == []
