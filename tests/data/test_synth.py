"""Tests of the synthetic fine-grained dataset: CUB layout, determinism, and that fine detail separates siblings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raml.data.synth import PATTERNS, generate_synthetic_dataset, make_class_specs, render_image
from raml.locking import DirectoryLock, LockHeldError


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("synth") / "cub", num_classes=4, images_per_class=3, image_size=32, seed=0
    )


def test_cub_layout_and_consistent_ids(tiny: Path) -> None:
    images = [line.split() for line in (tiny / "images.txt").read_text().splitlines()]
    classes = [line.split() for line in (tiny / "classes.txt").read_text().splitlines()]
    labels = [line.split() for line in (tiny / "image_class_labels.txt").read_text().splitlines()]
    split = [line.split() for line in (tiny / "train_test_split.txt").read_text().splitlines()]
    assert [int(i) for i, _ in images] == list(range(1, 13))
    assert [int(c) for c, _ in classes] == [1, 2, 3, 4]
    folder_of = {int(c): f for c, f in classes}
    for (img_id, rel), (lab_id, cls), (split_id, flag) in zip(images, labels, split, strict=True):
        assert img_id == lab_id == split_id
        folder, name = rel.split("/")
        assert folder == folder_of[int(cls)]
        number, _, class_name = folder.partition(".")
        assert len(number) == 3 and int(number) == int(cls) and class_name.startswith("Synth_")
        assert name.endswith(".jpg")
        assert int(flag) == (1 if int(cls) <= 2 else 0)
        assert (tiny / "images" / rel).is_file()
    # classes appear in images.txt in id order, each with 3 images
    assert [int(c) for _, c in labels] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_images_decode_to_requested_size_and_vary_within_class(tiny: Path) -> None:
    rels = [line.split()[1] for line in (tiny / "images.txt").read_text().splitlines()]
    arrays = []
    for rel in rels[:3]:  # the three images of class 1
        with Image.open(tiny / "images" / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
            arrays.append(np.asarray(im, dtype=np.float32))
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(arrays[i] - arrays[j]).mean() > 5.0


def test_deterministic_per_seed(tiny: Path, tmp_path: Path) -> None:
    again = generate_synthetic_dataset(tmp_path / "a", num_classes=4, images_per_class=3, image_size=32, seed=0)
    assert _tree_digest(again) == _tree_digest(tiny)
    other = generate_synthetic_dataset(tmp_path / "b", num_classes=4, images_per_class=3, image_size=32, seed=1)
    a, b = _tree_digest(tiny), _tree_digest(other)
    assert sum(a[k] != b.get(k) for k in a if k.endswith(".jpg")) > 0


@pytest.mark.parametrize("bad", [3, 0, -2])
def test_odd_or_empty_class_count_refused(bad: int, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        generate_synthetic_dataset(tmp_path / "x", num_classes=bad, images_per_class=1, image_size=32)
    assert not (tmp_path / "x" / "images.txt").exists()


def test_families_never_straddle_the_train_test_halves() -> None:
    specs = make_class_specs(100, seed=0)
    assert [s.class_id for s in specs] == list(range(1, 101))
    train_families = {s.family for s in specs[:25]}
    val_families = {s.family for s in specs[25:50]}
    test_families = {s.family for s in specs[50:]}
    # nor the loader's default train/val split (ratio 0.5) of the first half
    assert not train_families & test_families and not val_families & test_families
    assert not train_families & val_families
    train_families |= val_families
    for fam in train_families | test_families:
        members = [s for s in specs if s.family == fam]
        assert 2 <= len(members) <= 4
        # siblings share everything coarse and differ only in the fine pattern
        assert len({(s.shape, s.harmonics, s.body_rgb, s.cap_rgb, s.aspect) for s in members}) == 1
        assert len({s.pattern for s in members}) == len(members)
        assert {s.pattern for s in members} <= set(PATTERNS)
    assert len({s.folder for s in specs}) == 100


def _rms_at(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """RMS difference of two templates after a Lanczos resize to ``size`` (the evaluation resampler)."""
    ra = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    rb = np.asarray(Image.fromarray(b).resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    return float(np.sqrt(((ra - rb) ** 2).mean()))


def test_fine_detail_separates_siblings_and_vanishes_at_half_size() -> None:
    """Siblings differ in fine detail that a 2x smaller image loses; families differ in coarse appearance."""
    specs = make_class_specs(16, seed=0)
    templates = {s.class_id: render_image(s, 128) for s in specs}
    sib_ratios, fam_ratios = [], []
    for a in specs:
        for b in specs:
            if a.class_id >= b.class_id:
                continue
            large = _rms_at(templates[a.class_id], templates[b.class_id], 64)
            small = _rms_at(templates[a.class_id], templates[b.class_id], 32)
            (sib_ratios if a.family == b.family else fam_ratios).append(small / large)
    assert sib_ratios and fam_ratios
    # the sibling difference mostly disappears from 64 px to 32 px, the family difference does not
    assert np.median(sib_ratios) < 0.6
    assert np.median(fam_ratios) > 0.85
    assert np.median(sib_ratios) < 0.65 * np.median(fam_ratios)
    # patterns whose mean is the plain colour (dots, diamonds) are all but invisible to a plain sibling at 32 px
    assert min(sib_ratios) < 0.25


def test_a_rerun_removes_the_temporary_files_a_stopped_generation_left(tiny: Path, tmp_path: Path) -> None:
    """A SIGTERM while an image or an index file is written leaves its hidden temporary file; the next
    generation into the folder removes those (of its own files only), under the folder's lock."""
    out = generate_synthetic_dataset(tmp_path / "cub", num_classes=4, images_per_class=3, image_size=32, seed=0)
    class_folder = next(p for p in sorted((out / "images").iterdir()) if p.is_dir())
    image = next(class_folder.glob("*.jpg"))
    ours = [class_folder / f".{image.name}.0a1b2c3d.tmp", out / ".images.txt.deadbeef.tmp"]
    foreign = [out / ".notes.txt.12345678.tmp", class_folder / ".mine.tmp", out / "images" / ".x.jpg.0a1b2c3d.tmp"]
    for path in ours + foreign:
        path.write_bytes(b"partial")
    # a generation still writing: refused, nothing removed
    with DirectoryLock(out, "another generation"), pytest.raises(LockHeldError):
        generate_synthetic_dataset(out, num_classes=4, images_per_class=3, image_size=32, seed=0)
    assert all(p.exists() for p in ours + foreign)
    generate_synthetic_dataset(out, num_classes=4, images_per_class=3, image_size=32, seed=0)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in foreign)
    for path in foreign:
        path.unlink()
    assert _tree_digest(out) == _tree_digest(tiny)


def test_the_images_are_generated_one_at_a_time_not_listed_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A huge --images-per-class filled the memory with the list of every (class, image) pair before the first
    image was drawn; the first image is now drawn before any such list exists."""
    import tracemalloc

    import raml.data.synth as synth

    class FirstImage(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> np.ndarray:
        raise FirstImage

    monkeypatch.setattr(synth, "render_image", stop)
    tracemalloc.start()
    try:
        with pytest.raises(FirstImage):
            generate_synthetic_dataset(tmp_path / "cub", num_classes=2, images_per_class=500_000, image_size=16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB allocated before the first image (a list of every job?)"
