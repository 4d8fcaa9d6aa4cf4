"""Image loading (every mode -> RGB, every failure -> ImageLoadError), the eval transform, ImageDataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raml.data.datasets import ImageDataset
from raml.data.images import (
    EvalTransform,
    ImageLoadError,
    centre_crop_box,
    eval_resize_size,
    load_image,
    resize_shorter,
    to_rgb,
)
from raml.data.splits import get_split

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


# ------------------------------------------------------------------------------------ mode conversion


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "LA", "RGBA", "CMYK", "YCbCr", "P"])
def test_to_rgb_plain_modes_match_pil_convert(mode: str) -> None:
    src = Image.new("RGB", (5, 4), (200, 100, 50)).convert(mode)
    out = to_rgb(src)
    assert out.mode == "RGB" and out.size == (5, 4)
    expected = np.asarray(src.convert("RGBA").convert("RGB") if mode == "P" else src.convert("RGB"))
    np.testing.assert_array_equal(_pixels(out), expected)


def test_to_rgb_drops_alpha_keeping_colour() -> None:
    src = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    np.testing.assert_array_equal(_pixels(to_rgb(src)), np.full((3, 3, 3), [10, 20, 30]))
    src = Image.new("LA", (3, 3), (77, 0))
    np.testing.assert_array_equal(_pixels(to_rgb(src)), np.full((3, 3, 3), 77))


def test_to_rgb_palette_with_transparency() -> None:
    src = Image.new("P", (4, 2), 1)
    src.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    src.putpixel((0, 0), 2)
    src.info["transparency"] = 1  # index 1 (red) is transparent
    out = _pixels(to_rgb(src))
    assert tuple(out[0, 0]) == (0, 255, 0)
    assert tuple(out[1, 3]) == (255, 0, 0)  # colour under the transparent pixel kept, alpha dropped
    src.info["transparency"] = bytes([255, 0, 255])  # per-index alpha as bytes
    assert tuple(_pixels(to_rgb(src))[1, 3]) == (255, 0, 0)


def test_to_rgb_palette_alpha_mode() -> None:
    src = Image.new("RGBA", (2, 2), (9, 99, 199, 128)).convert("PA")
    assert src.mode == "PA"
    np.testing.assert_array_equal(_pixels(to_rgb(src)), np.asarray(src.convert("RGBA").convert("RGB")))


def test_to_rgb_16_bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768], [65535, 1000, 65534]], dtype=np.uint16)
    src = Image.fromarray(values)
    assert src.mode == "I;16"
    out = _pixels(to_rgb(src))
    expected = [[round(v * 255 / 65535) for v in row] for row in values.tolist()]
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert out[0, 2, 0] == 128 and out[1, 0, 0] == 255


def test_to_rgb_big_endian_16_bit() -> None:
    src = Image.frombytes("I;16B", (2, 1), np.array([257, 65535], dtype=">u2").tobytes())
    np.testing.assert_array_equal(_pixels(to_rgb(src))[0, :, 1], [1, 255])


def test_to_rgb_32_bit_int_is_read_as_16_bit() -> None:
    src = Image.fromarray(np.array([[-5, 0, 257 * 100, 65535, 100000]], dtype=np.int32))
    assert src.mode == "I"
    np.testing.assert_array_equal(_pixels(to_rgb(src))[0, :, 0], [0, 0, 100, 255, 255])


def test_to_rgb_32_bit_int_far_outside_16_bit_is_clipped_before_scaling() -> None:
    """Values far below 0 or above 65535 are clipped to 0 / 255 (the rule ``round(clip(v, 0, 65535) * 255 /
    65535)``), not wrapped around 8 bits: -5 rounds to 0 even unclipped, -1000 does not."""
    values = [-1000, -70000, -(2**31), 70000, 2**31 - 1, 300]
    src = Image.fromarray(np.array([values], dtype=np.int32))
    assert src.mode == "I"
    expected = [round(min(max(v, 0), 65535) * 255 / 65535) for v in values]
    assert expected == [0, 0, 0, 255, 255, 1]
    np.testing.assert_array_equal(_pixels(to_rgb(src))[0, :, 0], expected)


def test_to_rgb_palette_with_byte_transparency_goes_through_rgba_without_warning() -> None:
    """PIL warns that a palette image with per-index alpha bytes should be converted to RGBA: to_rgb does so
    (the pixels are the same either way, so only the warning tells the two paths apart)."""
    import warnings

    src = Image.new("P", (4, 2), 1)
    src.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    src.info["transparency"] = bytes([255, 0, 255])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _pixels(to_rgb(src))
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_to_rgb_float_is_read_as_unit_range() -> None:
    src = Image.fromarray(np.array([[-0.5, 0.0, 0.5, 1.0, 3.0, np.nan]], dtype=np.float32))
    assert src.mode == "F"
    np.testing.assert_array_equal(_pixels(to_rgb(src))[0, :, 0], [0, 0, 128, 255, 255, 0])


def test_to_rgb_float_over_several_bands_equals_the_per_pixel_rule() -> None:
    """1024 x 600: three bands of rows (2^18 pixels each); every value against ``round(v * 255)`` clipped (Python's
    round: halves to even), NaN -> 0, +-inf -> 255 / 0."""
    rng = np.random.default_rng(5)
    values = rng.normal(0.5, 0.7, (600, 1024)).astype(np.float32)
    values.flat[::97] = np.nan
    values.flat[1::89] = np.inf
    values.flat[2::83] = -np.inf
    values.flat[3::7] = np.float32(0.5 / 255) * rng.integers(0, 511, values.flat[3::7].size)  # near the halves
    got = _pixels(to_rgb(Image.fromarray(values, mode="F")))

    def rule(v: float) -> int:
        if v != v:
            return 0
        return 255 if v * 255.0 >= 255 else 0 if v * 255.0 <= 0 else round(v * 255.0)

    expected = np.array([[rule(float(v)) for v in row] for row in values.astype(np.float64)], dtype=np.uint8)
    np.testing.assert_array_equal(got[..., 0], expected)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_to_rgb_float_needs_no_float64_copy_of_the_whole_image() -> None:
    """A float image is converted a band of rows at a time: numpy's peak for 2000 x 2000 stays under 3 bytes a pixel
    (the grey result, one band); a whole-image float64 copy with its temporaries took over 30."""
    import tracemalloc

    src = Image.fromarray(np.full((2000, 2000), 0.25, dtype=np.float32), mode="F")
    tracemalloc.start()
    try:
        rgb = to_rgb(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.getpixel((1999, 1999)) == (64, 64, 64)
    assert peak < 3 * 2000 * 2000, peak


def test_to_rgb_returns_a_copy() -> None:
    src = Image.new("RGB", (2, 2), (1, 2, 3))
    out = to_rgb(src)
    out.putpixel((0, 0), (9, 9, 9))
    assert src.getpixel((0, 0)) == (1, 2, 3)


# ------------------------------------------------------------------------------------ loading files


@pytest.mark.parametrize(
    ("name", "mode", "expected"),
    [
        ("rgb.png", "RGB", (200, 100, 50)),
        ("rgb.bmp", "RGB", (200, 100, 50)),
        ("gray.png", "L", None),
        ("gray_alpha.png", "LA", None),
        ("rgba.png", "RGBA", (200, 100, 50)),
        ("palette.gif", "P", None),
        ("cmyk.jpg", "CMYK", None),
        ("deep.png", "I;16", (200, 200, 200)),
        ("deep_int.tiff", "I", (200, 200, 200)),
        ("float.tiff", "F", (200, 200, 200)),
    ],
)
def test_load_image_every_mode_gives_rgb(
    image_factory: Callable[..., Path], tmp_path: Path, name: str, mode: str, expected: tuple | None
) -> None:
    path = image_factory(tmp_path / name, size=(7, 5), color=(200, 100, 50), mode=mode)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (7, 5)
    if expected is not None:
        np.testing.assert_array_equal(_pixels(img), np.broadcast_to(expected, (5, 7, 3)))
    with Image.open(path) as raw:
        raw.load()
        np.testing.assert_array_equal(_pixels(img), _pixels(to_rgb(raw)))


def test_load_image_palette_png_with_transparency(tmp_path: Path) -> None:
    src = Image.new("P", (4, 2), 1)
    src.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    path = tmp_path / "t.png"
    src.save(path, transparency=1)
    assert tuple(_pixels(load_image(path))[0, 0]) == (255, 0, 0)


def test_load_image_accepts_str(image_factory: Callable[..., Path], tmp_path: Path) -> None:
    path = image_factory(tmp_path / "a.jpg")
    assert load_image(str(path)).size == (40, 30)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"missing\.jpg.*does not exist"):
        load_image(tmp_path / "missing.jpg")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.jpg.*0 bytes"):
        load_image(tmp_path / "empty.jpg")


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("hello, I am not a picture\n")
    with pytest.raises(ImageLoadError, match=r"text\.png.*UnidentifiedImageError"):
        load_image(tmp_path / "text.png")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=f"cut\\{suffix}.*truncated"):
        load_image(path)


# ------------------------------------------------------------------------------------ resizing


def test_eval_resize_size() -> None:
    assert eval_resize_size(224) == 256
    assert eval_resize_size(448) == 512
    assert eval_resize_size(100) == pytest.approx(100 + 100 / 7)


@pytest.mark.parametrize(("size", "shorter"), [(224, 256), (448, 512)])
def test_resize_shorter_published_sizes(size: int, shorter: int) -> None:
    landscape = resize_shorter(Image.new("RGB", (300, 200)), eval_resize_size(size))
    assert landscape.size == (round(300 * shorter / 200), shorter)
    portrait = resize_shorter(Image.new("RGB", (150, 333)), eval_resize_size(size))
    assert portrait.size == (shorter, round(333 * shorter / 150))


def test_resize_shorter_rounds_each_side() -> None:
    # 100 -> shorter 114.2857: short side 114, long side 140 * 1.142857 = 160 exactly
    assert resize_shorter(Image.new("RGB", (140, 100)), eval_resize_size(100)).size == (160, 114)
    # Halves go to the even neighbour (Python's round, as the reference): 41 * 1.5 = 61.5 -> 62,
    # 43 * 1.5 = 64.5 -> 64 (half up would give 65), 681 * 0.5 = 340.5 -> 340
    assert resize_shorter(Image.new("RGB", (41, 30)), 45).size == (62, 45)
    assert resize_shorter(Image.new("RGB", (43, 30)), 45).size == (64, 45)
    assert resize_shorter(Image.new("RGB", (681, 512)), eval_resize_size(224)).size == (340, 256)
    assert resize_shorter(Image.new("RGB", (512, 681)), eval_resize_size(224)).size == (256, 340)


def test_resize_shorter_uses_lanczos_by_default() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    expected = img.resize((24, 18), resample=Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(resize_shorter(img, 18)), np.asarray(expected))


def test_resize_shorter_bad_input() -> None:
    with pytest.raises(ValueError, match="positive"):
        resize_shorter(Image.new("RGB", (4, 4)), 0)
    with pytest.raises(TypeError, match="PIL image"):
        resize_shorter(np.zeros((4, 4, 3)), 10)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ eval transform


def _manual_eval(img: Image.Image, size: int, mean, std) -> np.ndarray:
    """Obvious reference, the reference's ``fg_eval_transform`` arithmetic: ``imrescale(img, S + S/7, min)``
    (``ratio = target / min(w, h)``, each side ``round(ratio * side)`` with Python's round), PIL Lanczos,
    explicit centre-crop box, numpy normalisation."""
    w, h = img.size
    target = size + size / 7
    ratio = target / min(w, h)
    new_w, new_h = round(ratio * w), round(ratio * h)
    resized = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    crop = resized.crop((left, top, left + size, top + size))
    x = np.asarray(crop, dtype=np.float64) / 255.0
    x = (x - np.asarray(mean)) / np.asarray(std)
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize(("w", "h", "size"), [(97, 61, 32), (45, 83, 21), (50, 50, 28), (64, 39, 14)])
def test_eval_transform_matches_manual(w: int, h: int, size: int) -> None:
    rng = np.random.default_rng(w * h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = EvalTransform(size, MEAN, STD)(img)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _manual_eval(img, size, MEAN, STD), atol=1e-5)


def _torchvision_eval(img: Image.Image, size: int, mean, std) -> torch.Tensor:
    """The composition EvalTransform ran up to 2026-12-04, and with which the published figures, the indexes and
    the query embeddings were made: torchvision's center_crop and to_tensor, then torch's normalisation."""
    import torchvision.transforms.functional as TF

    resized = resize_shorter(img, size + size / 7)
    x = TF.to_tensor(TF.center_crop(resized, [size, size]))
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_eval_transform_is_bit_identical_to_the_torchvision_composition() -> None:
    """Sizes whose crop offset is a half (37 - 32 = 5: torchvision rounds 2.5 to 2), odd and even sides, both
    orientations, every pixel value: the same float32 values, not only close ones."""
    rng = np.random.default_rng(11)
    cases = [(97, 61, 32), (61, 97, 32), (45, 83, 21), (50, 50, 28), (64, 39, 14), (37, 200, 32), (681, 512, 224)]
    cases += [(int(rng.integers(1, 300)), int(rng.integers(1, 300)), int(rng.integers(1, 64))) for _ in range(40)]
    for w, h, size in cases:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours, theirs = EvalTransform(size, MEAN, STD)(img), _torchvision_eval(img, size, MEAN, STD)
        assert ours.dtype == theirs.dtype == torch.float32 and ours.is_contiguous()
        assert torch.equal(ours, theirs), (w, h, size)
    ramp = Image.fromarray(np.arange(256 * 3, dtype=np.uint8).reshape(16, 16, 3).repeat(4, 0).repeat(4, 1))
    assert torch.equal(EvalTransform(64, MEAN, STD)(ramp), _torchvision_eval(ramp, 64, MEAN, STD))


def test_centre_crop_box_places_the_square_as_torchvision() -> None:
    assert centre_crop_box((37, 32), 32) == (2, 0, 34, 32)  # (37 - 32) / 2 = 2.5: to the even neighbour
    assert centre_crop_box((39, 32), 32) == (4, 0, 36, 32)  # 3.5 -> 4
    assert centre_crop_box((32, 40), 32) == (0, 4, 32, 36)
    with pytest.raises(ValueError, match="Cannot crop 32 x 32 pixels from an image of 31 x 40"):
        centre_crop_box((31, 40), 32)


def test_eval_transform_681x512_at_224_gets_the_reference_crop() -> None:
    # 681 x 512 at 224: the shorter side goes to 256, the longer to 681 * 0.5 = 340.5, which the reference's
    # round() sends to 340 (half up: 341, a wider image and another centre crop).
    rng = np.random.default_rng(681)
    coarse = rng.integers(0, 256, (16, 22, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((681, 512), Image.Resampling.BICUBIC)
    out = EvalTransform(224, MEAN, STD)(img)
    np.testing.assert_allclose(out.numpy(), _manual_eval(img, 224, MEAN, STD), atol=1e-5)
    resized = img.resize((341, 256), Image.Resampling.LANCZOS)  # what rounding half up would give
    left = int(round((341 - 224) / 2))
    half_up = np.asarray(resized.crop((left, 16, left + 224, 240)), dtype=np.float64) / 255.0
    half_up = ((half_up - np.asarray(MEAN)) / np.asarray(STD)).transpose(2, 0, 1)
    assert np.abs(out.numpy() - half_up).max() > 0.05


@pytest.mark.parametrize("size", [224, 448])
def test_eval_transform_published_sizes(size: int) -> None:
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    out = EvalTransform(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(img)
    assert out.shape == (3, size, size)
    torch.testing.assert_close(out[0], torch.ones(size, size))
    torch.testing.assert_close(out[1], torch.zeros(size, size))


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "224"])
def test_eval_transform_bad_size(size: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        EvalTransform(size, MEAN, STD)  # type: ignore[arg-type]


def test_eval_transform_bad_mean_std() -> None:
    with pytest.raises(ValueError, match="3 values"):
        EvalTransform(32, (0.5, 0.5), STD)
    with pytest.raises(ValueError, match="positive"):
        EvalTransform(32, MEAN, (0.2, 0.0, 0.2))


def test_eval_transform_bad_image() -> None:
    t = EvalTransform(16, MEAN, STD)
    with pytest.raises(ValueError, match="mode 'L'.*load_image"):
        t(Image.new("L", (20, 20)))
    with pytest.raises(TypeError, match="PIL image"):
        t(torch.zeros(3, 20, 20))  # type: ignore[arg-type]


def test_eval_transform_repr() -> None:
    text = repr(EvalTransform(224, MEAN, STD))
    assert "size=224" in text and "256" in text and "LANCZOS" in text


# ------------------------------------------------------------------------------------ ImageDataset


def test_image_dataset_from_split(own_root: Path) -> None:
    split = get_split("mine-test", own_root)
    transform = EvalTransform(16, MEAN, STD)
    ds = ImageDataset.from_split(split, transform)
    assert len(ds) == 9
    x, y = ds[4]
    assert y == 1 and x.shape == (3, 16, 16)
    expected = transform(load_image(own_root / "mine" / split.paths[4]))
    torch.testing.assert_close(x, expected)
    assert ds[-1][1] == 2


def test_image_dataset_without_labels(image_factory: Callable[..., Path], tmp_path: Path) -> None:
    paths = [image_factory(tmp_path / f"{i}.png") for i in range(2)]
    ds = ImageDataset([str(p) for p in paths], None, lambda img: torch.tensor(img.size))
    assert ds[1][1] == -1
    assert ds[0][0].tolist() == [40, 30]


def test_image_dataset_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 paths but 1 labels"):
        ImageDataset(["a.jpg", "b.jpg"], [0], lambda img: img)
    with pytest.raises(ValueError, match="at least one"):
        ImageDataset([], None, lambda img: img)
    with pytest.raises(TypeError, match="single path"):
        ImageDataset("a.jpg", None, lambda img: img)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        ImageDataset(["a.jpg"], None, "resize")  # type: ignore[arg-type]
    ds = ImageDataset([tmp_path / "missing.jpg"], [3], lambda img: img)
    with pytest.raises(IndexError, match="out of range"):
        ds[1]
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        ds[0]
