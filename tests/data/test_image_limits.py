"""Size limits read from the header (issue 18, item 5) and the 16-bit conversion without float copies (item 6)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from raml.data.image_limits import (
    DEFAULT_MAX_PIXELS,
    ImageSizeTooLargeError,
    ImageTooLargeError,
    check_image_size,
    check_resized_size,
    check_size_within_limit,
    largest_image_size,
    resized_size,
)
from raml.data.images import EvalTransform, ImageLoadError, resize_shorter, to_rgb

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("size", [7, 32, 48, 224])
@pytest.mark.parametrize("width, height", [(1, 1), (7, 3), (681, 512), (512, 681), (100, 1), (3, 250), (64, 64)])
def test_resized_size_is_the_size_the_eval_transform_resizes_to(width, height, size):
    # independent: what resize_shorter actually produces on an image of that size
    actual = resize_shorter(Image.new("L", (width, height)), size + size / 7).size
    assert resized_size(width, height, size) == actual


def test_an_extreme_aspect_ratio_is_refused_by_its_resized_size():
    check_resized_size(4000, 3000, 224)  # a photo: fine
    check_image_size(4000, 3000, 224)
    with pytest.raises(ImageTooLargeError) as refused:
        check_resized_size(100_000, 1, 32)  # 100,000 pixels; its short side to 36.57 px: 3657143 x 37
    message = str(refused.value)
    assert "100000x1" in message and "3657143x37" in message and str(DEFAULT_MAX_PIXELS) in message
    assert isinstance(refused.value, ImageLoadError)  # handled wherever unreadable images are
    with pytest.raises(ImageTooLargeError):
        check_resized_size(1, 40_000, 224)
    with pytest.raises(ImageTooLargeError, match="over the limit of 1000 pixels"):
        check_image_size(40, 30, None, max_pixels=1000)
    check_image_size(4000, 3000, None)  # 12 M pixels: under the default


def test_the_eval_transform_refuses_before_resizing():
    # 40000 x 1 at 32 px would be resized to 1462857 x 37 (54 M pixels, 160 MB) before the centre crop
    thin = Image.new("RGB", (40_000, 1))
    with pytest.raises(ImageTooLargeError, match="1462857x37"):
        EvalTransform(32, MEAN, STD)(thin)
    assert EvalTransform(32, MEAN, STD)(Image.new("RGB", (300, 20))).shape == (3, 32, 32)


def _reference_16bit(values: np.ndarray) -> np.ndarray:
    """The documented rule, plainly: round(v * 255 / 65535) of v clipped to 0..65535."""
    return np.array([round(min(max(int(v), 0), 65535) * 255 / 65535) for v in values.ravel()], dtype=np.uint8)


def test_16bit_conversion_matches_the_rule_for_every_value():
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = np.asarray(to_rgb(Image.fromarray(every)))
    assert got.shape == (256, 256, 3) and (got == got[..., :1]).all()
    np.testing.assert_array_equal(got[..., 0].ravel(), _reference_16bit(every))
    wide = np.array([[-5, 0, 128, 129, 65535, 70000, 2**31 - 1]], dtype=np.int32)  # mode "I": clipped
    got = np.asarray(to_rgb(Image.fromarray(wide, mode="I")))[..., 0]
    np.testing.assert_array_equal(got.ravel(), _reference_16bit(wide))


def test_16bit_conversion_makes_no_float_copy_of_the_image():
    side = 3000
    image = Image.fromarray(np.tile(np.linspace(0, 65535, side).astype(np.uint16), (side, 1)))
    tracemalloc.start()  # numpy reports its buffers to tracemalloc (PIL's own buffers are not counted)
    try:
        to_rgb(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # one float64 copy alone would be 8 bytes per pixel; the banded integer conversion needs ~1 (+ one band)
    assert peak < 3 * side * side, f"{peak / side / side:.1f} bytes per pixel traced"


def test_bad_images_skip_leaves_out_an_image_too_large_once_resized(tmp_path):
    from raml.data.check import apply_bad_image_policy, check_image
    from raml.data.splits import split_from_lists

    root = tmp_path / "ds"
    for folder, names in (("a", ["ok1.png", "thin.png"]), ("b", ["ok2.png", "ok3.png"])):
        (root / folder).mkdir(parents=True)
        for name in names:
            size = (100_000, 1) if name == "thin.png" else (40, 30)  # 100,000 pixels, but 3657143 x 37 at 32 px
            Image.new("L", size).save(root / folder / name)
    assert check_image(root / "a" / "thin.png") is None  # without a size: only the image's own limits
    reason = check_image(root / "a" / "thin.png", image_size=32)
    assert reason is not None and reason.startswith("too large once resized") and "3657143x37" in reason
    assert check_image(root / "a" / "ok1.png", image_size=32) is None
    split = split_from_lists("thin", root, [["a/ok1.png", "a/thin.png"], ["b/ok2.png", "b/ok3.png"]])
    kept, bad = apply_bad_image_policy(split, "skip", image_size=32)
    assert [b.path for b in bad] == ["a/thin.png"] and "a/thin.png" not in kept.paths and len(kept) == 3


def test_the_late_error_names_the_file(tmp_path):
    from raml.data.images import load_image

    thin = tmp_path / "thin.png"
    Image.new("L", (100_000, 1)).save(thin)  # ~370 bytes; 3657143 x 37 once resized at 32 px
    with pytest.raises(ImageTooLargeError, match="3657143x37") as refused:
        EvalTransform(32, MEAN, STD)(load_image(thin))
    assert str(refused.value).startswith(f"Image {thin} is 100000x1 pixels")


def test_check_data_image_size_lists_an_image_too_large_once_resized(tmp_path, capsys):
    import argparse
    import json

    from raml.cli.check import add_parser

    folder = tmp_path / "data" / "mine"
    for cls in ("a", "b"):
        for i in range(2):
            (folder / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (i * 90, 20, 20)).save(folder / cls / f"{i}.png")
    Image.new("L", (100_000, 1)).save(folder / "b" / "thin.png")
    split = {"train": [["a/0.png", "a/1.png"]], "test": [["b/0.png", "b/1.png", "b/thin.png"]]}
    (folder / "split.json").write_text(json.dumps(split))

    def check(*extra: str) -> int:
        parser = argparse.ArgumentParser()
        add_parser(parser.add_subparsers(dest="command"))
        argv = ["check-data", "--data-root", str(tmp_path / "data"), "--datasets", "mine-test", "--no-progress"]
        args = parser.parse_args([*argv, *extra])
        return args.func(args)

    assert check() == 0  # no size: only the image's own pixels count (100,000)
    assert "mine-test: 3 images, 0 bad" in capsys.readouterr().out
    assert check("--image-size", "32") == 1
    out = capsys.readouterr().out
    assert f"{folder / 'b' / 'thin.png'}: too large once resized" in out and "3657143x37" in out
    assert "mine-test: 3 images, 1 bad" in out


# ------------------------------------------------------------------- a size too large for any image (not the images)


@pytest.mark.parametrize("max_pixels", [1, 3, 1000, 4096])
def test_largest_image_size_is_the_last_size_a_square_image_fits(max_pixels):
    # independent: what resize_shorter makes of a square image at each size
    def fits(size: int) -> bool:
        width, height = resize_shorter(Image.new("L", (3, 3)), size + size / 7).size
        return width * height <= max_pixels

    largest = largest_image_size(max_pixels)
    assert all(fits(size) for size in range(1, largest + 1)) and not fits(largest + 1)


def test_a_size_too_large_for_any_image_is_refused_as_a_size():
    largest = largest_image_size()
    assert largest == 5533  # 6323 x 6323 at 5533; 6325 x 6325 = 40,005,625 pixels at 5534
    check_size_within_limit(largest)
    with pytest.raises(ImageSizeTooLargeError) as refused:
        check_size_within_limit(8000)
    message = str(refused.value)
    assert isinstance(refused.value, ValueError)  # a setting: the CLI's one-line error, exit 2
    assert "Image size 8000 is too large" in message and "--image-size 5533 or less" in message
    assert "aspect ratio" not in message and "\n" not in message
    # per image (the evaluation transform, the service): the size is blamed, not the image's shape
    with pytest.raises(ImageTooLargeError) as per_image:
        check_resized_size(32, 32, 8000)
    message = str(per_image.value)
    assert "image size 8000 is too large for any image" in message and "at most 5533" in message
    assert "aspect ratio" not in message and "crop" not in message


def test_the_aspect_ratio_is_named_only_as_the_cause():
    with pytest.raises(ImageTooLargeError) as thin:
        check_resized_size(100_000, 1, 32)
    assert "its aspect ratio 100,000:1 is over the roughly 29,561:1 that image size 32 allows" in str(thin.value)
    # a usual shape at a size where squares still fit: the ratio is named with its value, not called extreme
    check_resized_size(1000, 1000, 5533)
    with pytest.raises(ImageTooLargeError) as photo:
        check_resized_size(1000, 1300, 5500)
    assert "its aspect ratio 1.3:1 is over the roughly 1.012:1" in str(photo.value)
    assert "extreme" not in str(photo.value)


def test_a_scan_refuses_the_size_before_reading_any_file(tmp_path, monkeypatch):
    """``--bad-images skip`` dropped every image (each "too large once resized ... an extreme aspect ratio"); the
    size is now refused before a file is read, under either policy."""
    import raml.data.check as check_module
    from raml.data.check import apply_bad_image_policy, scan_split
    from raml.data.splits import split_from_lists

    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    for name in ("0.png", "1.png"):
        Image.new("RGB", (32, 32)).save(root / "a" / name)
    split = split_from_lists("small", root, [["a/0.png", "a/1.png"]])

    def no_reading(*args, **kwargs):
        raise AssertionError("an image was checked")

    monkeypatch.setattr(check_module, "check_image", no_reading)
    for policy in ("error", "skip"):
        with pytest.raises(ImageSizeTooLargeError, match="--image-size 5533 or less"):
            apply_bad_image_policy(split, policy, image_size=8000)
    with pytest.raises(ImageSizeTooLargeError):
        scan_split(split, image_size=8000)


def test_check_data_refuses_a_size_too_large_for_any_image(tmp_path, capsys):
    import json

    from raml.cli import main as cli_main

    folder = tmp_path / "data" / "mine"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(folder / cls / "0.png")
    (folder / "split.json").write_text(json.dumps({"train": [["a/0.png"]], "test": [["b/0.png"]]}))
    argv = ["check-data", "--data-root", str(tmp_path / "data"), "--datasets", "mine-test", "--no-progress"]
    assert cli_main.main([*argv, "--image-size", "8000"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1].startswith("raml check-data: error: Image size 8000 is too large")
    assert "too large once resized" not in captured.out
