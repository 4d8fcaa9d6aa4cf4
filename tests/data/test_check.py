"""Bad-image detection: fast (headers + file ends) and full-decode checks, skip/error policies, ``check-data``."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import raml.data.check as check_module
import raml.data.images as images_module
from raml.cli.check import add_parser
from raml.data.check import (
    BAD_IMAGE_POLICIES,
    MAX_LISTED,
    TAIL_BYTES,
    BadImage,
    BadImagesError,
    apply_bad_image_policy,
    check_image,
    drop_bad_images,
    report_file_name,
    scan_split,
)
from raml.data.splits import Split, get_split, split_from_lists


def _noise_jpeg(path: Path, size: int = 48, seed: int = 0, **save_kwargs) -> bytes:
    """A noisy RGB JPEG (noise gives a scan long enough to corrupt); returns its bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90, **save_kwargs)
    return path.read_bytes()


def _save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _good_images(folder: Path) -> dict[str, Path]:
    """Valid images in modes load_image converts; none of them may be reported."""
    rgb = Image.new("RGB", (20, 12), (200, 100, 50))
    sixteen = Image.fromarray(np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 200)
    assert sixteen.mode == "I;16"
    made = {
        "rgb.jpg": _save(folder / "rgb.jpg", rgb),
        "gray.png": _save(folder / "gray.png", rgb.convert("L")),
        "gray.jpg": _save(folder / "gray.jpg", rgb.convert("L")),
        "cmyk.jpg": _save(folder / "cmyk.jpg", rgb.convert("CMYK")),
        "palette.png": _save(folder / "palette.png", rgb.convert("P")),
        "rgba.png": _save(folder / "rgba.png", rgb.convert("RGBA")),
        "la.png": _save(folder / "la.png", rgb.convert("LA")),
        "sixteen.png": _save(folder / "sixteen.png", sixteen),
    }
    # A JPEG followed by a trailer longer than TAIL_BYTES (phones append metadata or a video after EOI).
    data = _noise_jpeg(folder / "trailer.jpg", seed=5)
    (folder / "trailer.jpg").write_bytes(data + b"\x00\x01" * TAIL_BYTES)
    made["trailer.jpg"] = folder / "trailer.jpg"
    (folder / "progressive.jpg").write_bytes(_noise_jpeg(folder / "progressive.jpg", seed=7, progressive=True))
    made["progressive.jpg"] = folder / "progressive.jpg"
    # Short trailing garbage right after EOI.
    (folder / "garbage.jpg").write_bytes(_noise_jpeg(folder / "garbage.jpg", seed=6) + b"garbage")
    made["garbage.jpg"] = folder / "garbage.jpg"
    return made


@pytest.fixture
def mixed_split(tmp_path: Path):
    """4 classes: 'good' (all fine), 'mixed' (1 truncated JPEG), 'allbad' (empty/text/missing), 'tail'.

    Returns the split and the expected bad paths -> a word their reason must contain.
    """
    root = tmp_path / "ds"
    good = _good_images(root / "good")
    _noise_jpeg(root / "mixed" / "ok1.jpg", seed=1)
    data = _noise_jpeg(root / "mixed" / "cut.jpg", seed=2)
    (root / "mixed" / "cut.jpg").write_bytes(data[: len(data) - 150])
    _noise_jpeg(root / "mixed" / "ok2.jpg", seed=3)
    (root / "allbad").mkdir()
    (root / "allbad" / "empty.jpg").write_bytes(b"")
    (root / "allbad" / "text.jpg").write_text("<html>404 Not Found</html>\n")
    _save(root / "tail" / "ok.png", Image.new("RGB", (30, 20), (1, 2, 3)))
    png = _save(root / "tail" / "cut.png", Image.new("RGB", (30, 20), (4, 5, 6))).read_bytes()
    (root / "tail" / "cut.png").write_bytes(png[:-20])
    classes = [
        [f"good/{name}" for name in good],
        ["mixed/ok1.jpg", "mixed/cut.jpg", "mixed/ok2.jpg"],
        ["allbad/empty.jpg", "allbad/text.jpg", "allbad/missing.jpg"],
        ["tail/ok.png", "tail/cut.png"],
    ]
    expected = {
        "mixed/cut.jpg": "truncated JPEG",
        "allbad/empty.jpg": "empty file",
        "allbad/text.jpg": "not an image",
        "allbad/missing.jpg": "missing file",
        "tail/cut.png": "truncated PNG",
    }
    return split_from_lists("mixed", root, classes), expected


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel data is decoded (load_image, or PIL's ImageFile.load)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the fast check decoded pixels")

    monkeypatch.setattr(check_module, "load_image", forbidden)
    monkeypatch.setattr(images_module, "load_image", forbidden)
    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden)


# ---------------------------------------------------------------------------------------------- check_image


@pytest.mark.parametrize("full_decode", [False, True])
def test_convertible_modes_and_trailers_are_not_bad(tmp_path: Path, full_decode: bool) -> None:
    for name, path in _good_images(tmp_path).items():
        assert check_image(path, full_decode=full_decode) is None, name


def test_fast_mode_finds_every_bad_file_without_decoding(mixed_split, no_decoding) -> None:
    split, expected = mixed_split
    bad = scan_split(split)
    assert [b.path for b in bad] == [p for p in split.paths if p in expected]  # split order
    for b in bad:
        assert expected[b.path] in b.reason, b
        assert "\t" not in b.reason and "\n" not in b.reason


def test_threads_and_progress_give_the_same_result(mixed_split) -> None:
    split, _ = mixed_split
    assert scan_split(split, workers=3, progress=True) == scan_split(split)
    with pytest.raises(ValueError, match="workers"):
        scan_split(split, workers=0)


def test_exif_thumbnail_end_marker_does_not_hide_truncation(tmp_path: Path, no_decoding) -> None:
    # An FF D9 inside the header (e.g. an EXIF thumbnail) must not count as the end of the image.
    path = tmp_path / "thumb.jpg"
    data = _noise_jpeg(path, size=16, exif=b"Exif\x00\x00" + b"\xff\xd8thumb\xff\xd9" * 3)
    assert len(data) < TAIL_BYTES and data.find(b"\xff\xd9") < len(data) - 2
    path.write_bytes(data[:-40])
    assert "truncated JPEG" in check_image(path)


def _noise(size: tuple[int, int] = (37, 23), seed: int = 0) -> Image.Image:
    """Noise (long compressed data, odd sides: padded BMP rows)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _good_structured_images(folder: Path) -> dict[str, Path]:
    """Intact files of the formats whose end the fast check finds from their structure (no decoding)."""
    rgb = _noise()
    frames = [rgb.quantize(16), rgb.rotate(90, expand=True).quantize(16)]
    return {
        "rgb.bmp": _save(folder / "rgb.bmp", rgb),
        "gray.bmp": _save(folder / "gray.bmp", rgb.convert("L")),
        "bw.bmp": _save(folder / "bw.bmp", rgb.convert("1")),
        "rgba.bmp": _save(folder / "rgba.bmp", rgb.convert("RGBA")),
        "palette.gif": _save(folder / "palette.gif", rgb),
        # two frames, the second with its own (local) colour table, and a comment extension
        "anim.gif": _save(folder / "anim.gif", frames[0], save_all=True, append_images=frames[1:], comment=b"hi"),
        "rgb.webp": _save(folder / "rgb.webp", rgb),
    }


def test_intact_bmp_gif_and_webp_pass_the_fast_check_without_decoding(tmp_path: Path, no_decoding) -> None:
    for name, path in _good_structured_images(tmp_path).items():
        assert check_image(path) is None, name


@pytest.mark.parametrize(
    "suffix, cuts, reason",
    [
        ("bmp", (1, 37, 1000), "truncated BMP"),
        ("gif", (1, 2, 50, 300), "truncated GIF"),
        ("webp", (1, 100), "unreadable image header"),  # PIL's WebP opener parses the whole file
    ],
)
def test_fast_check_finds_truncated_bmp_gif_and_webp_without_decoding(
    tmp_path: Path, no_decoding, suffix: str, cuts: tuple[int, ...], reason: str
) -> None:
    data = _save(tmp_path / f"whole.{suffix}", _noise()).read_bytes()
    for cut in cuts:
        path = tmp_path / f"cut{cut}.{suffix}"
        path.write_bytes(data[:-cut])
        problem = check_image(path)
        assert problem is not None and problem.startswith(reason), (cut, problem)


@pytest.mark.parametrize("suffix", ["tiff", "ppm"])
def test_fast_check_decodes_formats_without_a_structural_check(tmp_path: Path, suffix: str) -> None:
    data = _save(tmp_path / f"whole.{suffix}", _noise()).read_bytes()
    assert check_image(tmp_path / f"whole.{suffix}") is None
    (tmp_path / f"cut.{suffix}").write_bytes(data[:-30])
    problem = check_image(tmp_path / f"cut.{suffix}")
    assert problem is not None and problem.startswith("decoding failed") and "truncated" in problem


def test_skip_leaves_out_truncated_bmp_and_gif(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for name in ("ok.bmp", "cut.bmp", "ok.gif", "cut.gif"):
        data = _save(root / name, _noise(seed=len(name))).read_bytes()
        if name.startswith("cut"):
            (root / name).write_bytes(data[: len(data) // 2])
    split = split_from_lists("fmt", root, [["ok.bmp", "cut.bmp"], ["ok.gif", "cut.gif"]])
    kept, bad = apply_bad_image_policy(split, "skip")
    assert [b.path for b in bad] == ["cut.bmp", "cut.gif"] and kept.paths == ("ok.bmp", "ok.gif")


def test_end_marker_search_across_chunk_boundaries() -> None:
    data = io.BytesIO(b"abcde\xff\xd9fgh")
    for start in range(6):
        assert check_module._find_from(data, b"\xff\xd9", start, chunk_size=3) is True
    assert check_module._find_from(data, b"\xff\xd9", 6, chunk_size=3) is False


def test_zero_size_and_directory(tmp_path: Path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)  # width 0
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (tmp_path / "zero.png").write_bytes(png)
    assert check_image(tmp_path / "zero.png") is not None  # PIL refuses to identify a 0-wide image
    (tmp_path / "folder.jpg").mkdir()
    assert check_image(tmp_path / "folder.jpg") == "not a regular file"


def test_unconvertible_mode_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No file format opens as premultiplied 'La', which to_rgb cannot convert: fake the opened image.
    path = tmp_path / "odd.png"
    path.write_bytes(b"placeholder")
    monkeypatch.setattr(check_module.Image, "open", lambda f: Image.new("La", (4, 4)))
    assert "unsupported mode 'La'" in check_image(path)


def test_full_decode_finds_a_corrupt_scan_that_ends_with_eoi(tmp_path: Path) -> None:
    data = _noise_jpeg(tmp_path / "orig.jpg", size=64)
    scan = data.find(b"\xff\xda")
    mid = (scan + len(data)) // 2
    # A stray SOF marker inside the scan data: the file still ends with FF D9, libjpeg stops with an error.
    stray = tmp_path / "stray_marker.jpg"
    stray.write_bytes(data[:mid] + b"\xff\xc0\x00\x11" + data[mid + 4 :])
    assert stray.read_bytes().endswith(b"\xff\xd9")
    assert check_image(stray) is None
    reason = check_image(stray, full_decode=True)
    assert reason is not None and reason.startswith("decoding failed") and "broken data stream" in reason
    # Bytes overwritten with zeros: libjpeg only warns and PIL returns garbage pixels, so neither mode can
    # detect it (documented in raml.data.check).
    zeros = tmp_path / "zeros.jpg"
    zeros.write_bytes(data[:mid] + bytes(200) + data[mid + 200 :])
    assert check_image(zeros) is None and check_image(zeros, full_decode=True) is None


def test_full_decode_scan_finds_the_same_and_more(mixed_split, tmp_path: Path) -> None:
    split, expected = mixed_split
    data = (split.root / "mixed" / "ok2.jpg").read_bytes()
    mid = (data.find(b"\xff\xda") + len(data)) // 2
    (split.root / "mixed" / "ok2.jpg").write_bytes(data[:mid] + b"\xff\xc0\x00\x11" + data[mid + 4 :])
    assert {b.path for b in scan_split(split)} == set(expected)
    assert {b.path for b in scan_split(split, full_decode=True, workers=2)} == {*expected, "mixed/ok2.jpg"}


# ---------------------------------------------------------------------------------------------- policies


def test_drop_bad_images_removes_emptied_classes_and_renumbers(mixed_split, caplog) -> None:
    split, expected = mixed_split
    bad = scan_split(split)
    with caplog.at_level(logging.WARNING, logger="raml.data.check"):
        kept = drop_bad_images(split, bad)
    assert kept.name == split.name and kept.root == split.root
    assert list(kept.paths) == [p for p in split.paths if p not in expected]
    n_good = len(_good_images(split.root / "good"))
    assert list(kept.labels) == [0] * n_good + [1, 1] + [2]  # class 'allbad' (label 2) is gone
    assert kept.num_classes == 3
    assert "class 2 (first image allbad/empty.jpg)" in caplog.text
    assert drop_bad_images(split, []) is split


def test_drop_everything_is_an_error(tmp_path: Path) -> None:
    split = split_from_lists("gone", tmp_path, [["a.jpg"], ["b.jpg"]])
    with pytest.raises(ValueError, match="all 2 images are bad"):
        drop_bad_images(split, scan_split(split))


def test_skip_policy_filters_logs_and_writes_the_report(mixed_split, tmp_path: Path, caplog) -> None:
    split, expected = mixed_split
    with caplog.at_level(logging.WARNING, logger="raml.data.check"):
        kept, bad = apply_bad_image_policy(split, "skip", report_dir=tmp_path / "run")
    assert {b.path for b in bad} == set(expected)
    assert kept.num_classes == 3 and sorted(set(kept.labels)) == [0, 1, 2]
    assert not set(expected) & set(kept.paths)
    for path in expected:
        assert path in caplog.text
    lines = (tmp_path / "run" / "skipped_images_mixed.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [b.path for b in bad]
    assert all(len(line.split("\t")) == 2 for line in lines)


def _non_utf8_split(tmp_path: Path):
    """Two classes; ``a/bad\\xe9.jpg`` (a file name that is not valid UTF-8) is empty, ``a/caf\\xe9.jpg`` is fine."""
    root = tmp_path / "ds"
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
    bad_name, good_name = os.fsdecode(b"bad\xe9.jpg"), os.fsdecode(b"caf\xe9.jpg")
    assert bad_name == "bad\udce9.jpg"  # Python's surrogate-escaped spelling of the byte
    (root / "a" / bad_name).write_bytes(b"")
    _noise_jpeg(root / "a" / good_name, size=16)
    _noise_jpeg(root / "b" / "ok.jpg", size=16, seed=1)
    split = split_from_lists("nu", root, [[f"a/{bad_name}", f"a/{good_name}"], ["b/ok.jpg"]])
    return split, root


@pytest.mark.parametrize("policy, report", [("skip", "skipped_images_nu.txt"), ("error", "bad_images_nu.txt")])
def test_reports_name_a_non_utf8_file_name_byte_for_byte(tmp_path: Path, policy: str, report: str, caplog) -> None:
    split, _ = _non_utf8_split(tmp_path)
    if policy == "skip":
        with caplog.at_level(logging.WARNING, logger="raml.data.check"):
            kept, bad = apply_bad_image_policy(split, policy, report_dir=tmp_path / "run")
        assert len(kept) == 2 and [b.path for b in bad] == ["a/bad\udce9.jpg"]
        assert "a/bad\\xe9.jpg: empty file" in caplog.text  # the log spells the byte with a backslash escape
    else:
        with pytest.raises(BadImagesError) as refused:
            apply_bad_image_policy(split, policy, report_dir=tmp_path / "run")
        assert "a/bad\\xe9.jpg: empty file" in str(refused.value)
    # the file's own bytes, as `ls` and `xargs rm` see them
    assert (tmp_path / "run" / report).read_bytes() == b"a/bad\xe9.jpg\tempty file (0 bytes)\n"


@pytest.mark.parametrize("policy, report", [("skip", "skipped_images_lone.txt"), ("error", "bad_images_lone.txt")])
def test_reports_escape_a_lone_surrogate_that_stands_for_no_byte(tmp_path: Path, policy: str, report: str) -> None:
    """A split file's entry "a/\\ud800.jpg" (JSON lets a string hold a lone surrogate; no file can have that name)
    is a missing file; writing the report raised UnicodeEncodeError (surrogateescape encodes U+DC80-U+DCFF only)."""
    root = tmp_path / "ds"
    _noise_jpeg(root / "a" / "ok.jpg", size=16)
    _noise_jpeg(root / "b" / "ok.jpg", size=16, seed=1)
    split = split_from_lists("lone", root, [["a/\ud800.jpg", "a/ok.jpg"], ["b/ok.jpg"]])
    if policy == "skip":
        kept, bad = apply_bad_image_policy(split, policy, report_dir=tmp_path / "run")
        assert len(kept) == 2 and [b.path for b in bad] == ["a/\ud800.jpg"]
    else:
        with pytest.raises(BadImagesError):
            apply_bad_image_policy(split, policy, report_dir=tmp_path / "run")
    written = (tmp_path / "run" / report).read_bytes()
    assert written.startswith(b"a/\\ud800.jpg\t") and written.count(b"\n") == 1, written


def test_check_data_prints_a_non_utf8_file_name_with_escapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split, root = _non_utf8_split(tmp_path)  # tmp_path / "ds"
    (root / "split.json").write_text(json.dumps({"train": [list(split.paths[:2])], "test": [[split.paths[2]]]}))
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # a strict terminal or pipe
    monkeypatch.setattr("sys.stdout", stdout)
    out_json = tmp_path / "bad.json"
    assert _run_cli(["--data-root", str(tmp_path), "--datasets", "ds", "--json", str(out_json)]) == 1
    stdout.flush()
    printed = stdout.buffer.getvalue().decode("utf-8")
    assert f"ds: {root}/a/bad\\xe9.jpg: empty file (0 bytes)" in printed and "ds: 2 images, 1 bad" in printed
    assert json.loads(out_json.read_text()) == {"ds": [{"path": "a/bad\udce9.jpg", "reason": "empty file (0 bytes)"}]}


def test_clean_split_is_returned_unchanged(tmp_path: Path) -> None:
    good = _good_images(tmp_path / "ds")
    split = split_from_lists("clean", tmp_path / "ds", [list(good)])
    for policy in BAD_IMAGE_POLICIES:
        kept, bad = apply_bad_image_policy(split, policy, report_dir=tmp_path / "run")
        assert kept is split and bad == []
    assert (tmp_path / "run" / "skipped_images_clean.txt").read_text() == ""


def test_error_policy_names_every_bad_file(mixed_split) -> None:
    split, expected = mixed_split
    with pytest.raises(BadImagesError) as info:
        apply_bad_image_policy(split, "error", workers=2)
    message = str(info.value)
    for path, reason in expected.items():
        assert f"{path}: {reason}" in message
    assert "--bad-images skip" in message and "5 of " in message
    assert "train" not in message.split("\n")[-1]  # `raml extract` and `raml test` check splits too
    assert isinstance(info.value, ValueError) and len(info.value.bad) == 5


def test_error_message_is_capped_when_a_report_file_exists(tmp_path: Path) -> None:
    n = MAX_LISTED + 10
    split = split_from_lists("many", tmp_path / "ds", [[f"missing_{i:03d}.jpg" for i in range(n)]])
    with pytest.raises(BadImagesError) as info:
        apply_bad_image_policy(split, "error", report_dir=tmp_path / "run")
    report = tmp_path / "run" / "bad_images_many.txt"
    message = str(info.value)
    assert f"... and 10 more; full list in {report}" in message
    assert "missing_049.jpg" in message and "missing_050.jpg" not in message
    assert len(report.read_text().splitlines()) == n
    # Without a report file, every bad file is in the message.
    full = str(BadImagesError("many", tmp_path, [BadImage(f"f{i}.jpg", "missing file") for i in range(n)]))
    assert f"f{n - 1}.jpg: missing file" in full and "more" not in full


def test_unknown_policy_lists_the_valid_ones(mixed_split) -> None:
    split, _ = mixed_split
    with pytest.raises(ValueError, match="valid policies: error, skip"):
        apply_bad_image_policy(split, "ignore")


def test_report_file_name_is_safe() -> None:
    assert report_file_name("skipped_images", "cub-test") == "skipped_images_cub-test.txt"
    assert report_file_name("skipped_images", "my/split.json:test") == "skipped_images_my_split.json_test.txt"


def test_scan_of_200_small_images(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    classes = []
    for c in range(20):
        paths = []
        for i in range(10):
            rel = f"c{c}/{i}.jpg"
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / rel)
            paths.append(rel)
        classes.append(paths)
    split = split_from_lists("two-hundred", root, classes)
    assert scan_split(split, workers=2) == []


def test_threads_hold_a_bounded_number_of_images_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The threads get the paths through a bounded queue, not one future per image up front (memory ~ N)."""
    live = {"now": 0, "peak": 0}

    def gone() -> None:
        live["now"] -= 1

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs) -> Future:
            future = super().submit(fn, *args, **kwargs)
            live["now"] += 1
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(future, gone)
            return future

    monkeypatch.setattr(check_module, "ThreadPoolExecutor", CountingPool)
    monkeypatch.setattr(check_module, "CHECK_IN_FLIGHT", 8, raising=False)
    _save(tmp_path / "ok.png", Image.new("RGB", (8, 8)))
    paths = tuple("ok.png" if i % 3 else f"missing-{i}.jpg" for i in range(300))
    split = Split(name="many", root=tmp_path, paths=paths, labels=(0,) * len(paths))
    bad = scan_split(split, workers=2)
    assert [b.path for b in bad] == [p for p in paths if p != "ok.png"]  # split order, only the bad ones
    assert all(b.reason == "missing file" for b in bad)
    assert 8 <= live["peak"] <= 16, live  # the bound, not the 300 images


def test_an_error_in_a_check_thread_cancels_the_checks_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pool.map cancelled what had not started when a check raised; the bounded queue must too (else up to
    CHECK_IN_FLIGHT more checks run, each a full decode for some formats, before the error comes out)."""
    calls = {"n": 0}

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] > 1:
            time.sleep(0.02)  # a check takes time: the queued ones must not all run before the error comes out
        raise MemoryError("out of memory in a check")

    monkeypatch.setattr(check_module, "check_image", failing)
    monkeypatch.setattr(check_module, "CHECK_IN_FLIGHT", 1000, raising=False)
    paths = tuple(f"{i}.jpg" for i in range(3000))
    split = Split(name="many", root=tmp_path, paths=paths, labels=(0,) * len(paths))
    with pytest.raises(MemoryError, match="out of memory in a check"):
        scan_split(split, workers=2)
    assert calls["n"] < 100, calls  # the checks already running, not the 1,000 queued


# --------------------------------------------------------------------------------------------------- CLI


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["check-data", *argv])
    return args.func(args)


def test_cli_reports_bad_files_exit_status_and_json(tmp_path: Path, capsys) -> None:
    data_root = tmp_path / "data"
    folder = data_root / "mine"
    for i in range(3):
        _noise_jpeg(folder / "a" / f"{i}.jpg", size=16, seed=i)
        _noise_jpeg(folder / "b" / f"{i}.jpg", size=16, seed=10 + i)
    (folder / "b" / "1.jpg").write_bytes(b"")
    split = {"train": [[f"a/{i}.jpg" for i in range(3)]], "test": [[f"b/{i}.jpg" for i in range(3)] + ["b/x.jpg"]]}
    (folder / "split.json").write_text(json.dumps(split))
    out_json = tmp_path / "out" / "bad.json"

    status = _run_cli(
        ["--data-root", str(data_root), "--datasets", "mine,mine-test", "--workers", "2", "--json", str(out_json)]
    )
    assert status == 1
    stdout = capsys.readouterr().out
    assert "mine: 3 images, 0 bad" in stdout and "mine-test: 4 images, 2 bad" in stdout
    assert f"{folder / 'b' / '1.jpg'}: empty file (0 bytes)" in stdout
    assert f"{folder / 'b' / 'x.jpg'}: missing file" in stdout
    assert json.loads(out_json.read_text()) == {
        "mine": [],
        "mine-test": [
            {"path": "b/1.jpg", "reason": "empty file (0 bytes)"},
            {"path": "b/x.jpg", "reason": "missing file"},
        ],
    }
    assert get_split("mine-test", data_root).paths  # the split itself is untouched

    assert _run_cli(["--data-root", str(data_root), "--datasets", "mine", "--full-decode", "--no-progress"]) == 0
    assert "mine: 3 images, 0 bad" in capsys.readouterr().out


def test_cli_says_a_bare_dataset_name_is_the_train_part_only(tmp_path: Path, capsys) -> None:
    data_root = tmp_path / "data"
    folder = data_root / "mine"
    for i in range(2):
        _noise_jpeg(folder / "a" / f"{i}.jpg", size=16, seed=i)
        _noise_jpeg(folder / "b" / f"{i}.jpg", size=16, seed=10 + i)
    (folder / "split.json").write_text(json.dumps({"train": [["a/0.jpg", "a/1.jpg"]], "val": [["b/0.jpg", "b/1.jpg"]]}))

    assert _run_cli(["--data-root", str(data_root), "--datasets", "mine", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "'mine' is the train part of the dataset only" in err
    assert "`raml train -d mine` trains on mine-trainval" in err

    assert _run_cli(["--data-root", str(data_root), "--datasets", "mine-trainval", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "train part" not in captured.err
    assert "mine-trainval: 4 images, 0 bad" in captured.out
