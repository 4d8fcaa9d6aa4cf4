"""Galleries: frames of the right colour at the right places (checked pixel by pixel on generated galleries),
``raml search --gallery`` against its own JSON results, refusals that write nothing, and the demo's gallery rows
against an explicit ranking loop."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raml.cli import main as cli_main
from raml.data import get_split
from raml.demo import demo_gallery_rows, gallery_query_ids
from raml.deploy.gallery import (
    CELL_BACKGROUND,
    OTHER_LABEL_COLOR,
    QUERY_COLOR,
    SAME_LABEL_COLOR,
    UNKNOWN_LABEL_COLOR,
    GalleryLayout,
    GalleryRow,
    Hit,
    check_gallery_path,
    render_gallery,
    search_gallery_rows,
    write_gallery,
)
from raml.models import build_network, save_checkpoint

GREEN, RED, GREY, BLUE = (30, 160, 60), (215, 40, 40), (150, 150, 150), (40, 90, 200)


def test_the_colours_are_green_red_grey_and_blue():
    # stated independently of the module: a reader sees green for a match and red for a mismatch
    assert (SAME_LABEL_COLOR, OTHER_LABEL_COLOR, UNKNOWN_LABEL_COLOR, QUERY_COLOR) == (GREEN, RED, GREY, BLUE)


def _solid(tmp_path: Path, name: str, color: tuple[int, int, int], size=(50, 30)) -> str:
    path = tmp_path / f"{name}.png"
    Image.new("RGB", size, color).save(path)
    return str(path)


def _frame_and_centre(image: Image.Image, box: tuple[int, int, int, int], frame: int):
    left, top, right, bottom = box
    pixels = np.asarray(image)
    ring = np.concatenate(
        [
            pixels[top : top + frame, left:right].reshape(-1, 3),
            pixels[bottom - frame : bottom, left:right].reshape(-1, 3),
            pixels[top:bottom, left : left + frame].reshape(-1, 3),
            pixels[top:bottom, right - frame : right].reshape(-1, 3),
        ]
    )
    return ring, tuple(int(v) for v in pixels[(top + bottom) // 2, (left + right) // 2])


def test_frames_have_the_label_colours_at_the_layout_positions(tmp_path):
    colors = {"q1": (250, 250, 0), "a": (0, 200, 200), "b": (200, 0, 200), "c": (90, 60, 30), "q2": (10, 10, 10)}
    paths = {name: _solid(tmp_path, name, c) for name, c in colors.items()}
    rows = [
        # query of class 1: hits of class 1, class 2, unknown
        GalleryRow(paths["q1"], [[Hit(paths["a"], 1, 0.9), Hit(paths["b"], 2, 0.8), Hit(paths["c"], None, 0.7)]], 1),
        # query without a label: every frame grey whatever the hits' labels
        GalleryRow(paths["q2"], [[Hit(paths["b"], 2, 0.6), Hit(paths["a"], 1, 0.5), Hit(paths["c"], -1, 0.4)]]),
    ]
    out = write_gallery(rows, tmp_path / "gallery.png", thumb=40, frame=3)
    image = Image.open(out).convert("RGB")
    layout = GalleryLayout(num_rows=2, num_panels=1, k=3, thumb=40, frame=3)
    assert image.size == layout.size
    expected = {
        (0, None): (BLUE, colors["q1"]),
        (0, 0): (GREEN, colors["a"]),
        (0, 1): (RED, colors["b"]),
        (0, 2): (GREY, colors["c"]),
        (1, None): (BLUE, colors["q2"]),
        (1, 0): (GREY, colors["b"]),
        (1, 1): (GREY, colors["a"]),
        (1, 2): (GREY, colors["c"]),
    }
    boxes = []
    for (row, rank), (frame_rgb, image_rgb) in expected.items():
        box = layout.box(row, None) if rank is None else layout.box(row, 0, rank)
        ring, centre = _frame_and_centre(image, box, 3)
        assert (ring == frame_rgb).all(), (row, rank)  # PNG is lossless: every frame pixel is exact
        assert centre == image_rgb, (row, rank)
        boxes.append(box)
    # no two cells overlap and all lie inside the image
    for i, a in enumerate(boxes):
        assert 0 <= a[0] < a[2] <= image.size[0] and 0 <= a[1] < a[3] <= image.size[1]
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_panels_side_by_side_and_unreadable_images(tmp_path, caplog):
    q, a = _solid(tmp_path, "q", (0, 0, 255)), _solid(tmp_path, "a", (255, 0, 0), size=(20, 60))
    missing = str(tmp_path / "gone.png")
    rows = [GalleryRow(q, [[Hit(a, 0)], [Hit(missing, 1)]], 0)]
    image = render_gallery(rows, ["teacher", "student"], thumb=32, frame=2)
    layout = GalleryLayout(1, 2, 1, thumb=32, frame=2)
    assert image.size == layout.size
    ring, centre = _frame_and_centre(image, layout.box(0, 0), 2)
    assert (ring == GREEN).all() and centre == (255, 0, 0)
    ring, _ = _frame_and_centre(image, layout.box(0, 1), 2)
    assert (ring == RED).all()  # the frame still tells the label; the cell is drawn empty
    assert "cannot read" in caplog.text
    with pytest.raises(ValueError, match="same number"):
        render_gallery([rows[0], GalleryRow(q, [[Hit(a)]])])
    with pytest.raises(ValueError, match="2 panels"):
        render_gallery(rows, ["only one"])
    with pytest.raises(ValueError, match="at least one"):
        render_gallery([])


def _png(path: Path, width: int, height: int, chunks: list[tuple[bytes, bytes]]) -> str:
    """A PNG file: an 8-bit RGB header of the given size, then ``chunks`` (type, data) and IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + b"".join(chunk(*c) for c in [*chunks, (b"IEND", b"")]))
    return str(path)


def test_an_image_pil_refuses_in_any_way_is_an_empty_cell_and_the_gallery_is_written(tmp_path, caplog):
    """A huge image (DecompressionBombError) or a broken chunk (SyntaxError) is a crossed cell, not a crash."""
    q = _solid(tmp_path, "q", (0, 0, 255))
    huge = _png(tmp_path / "huge.png", 20000, 20000, [(b"IDAT", zlib.compress(b"\0" * 100))])  # a header only
    rng = np.random.default_rng(0)
    pixels = zlib.compress(b"".join(b"\0" + rng.bytes(24) for _ in range(8)))  # 8 rows of 8 RGB, no filter
    half = len(pixels) // 2  # the second half in a chunk whose type is not letters: PIL raises SyntaxError
    broken = _png(tmp_path / "broken.png", 8, 8, [(b"IDAT", pixels[:half]), (b"\x01\x02\x03\x04", pixels[half:])])
    rows = [GalleryRow(q, [[Hit(huge, 0), Hit(broken, 1)]], 0)]
    written = write_gallery(rows, tmp_path / "g.png", thumb=32, frame=2)
    image = Image.open(written).convert("RGB")
    layout = GalleryLayout(1, 1, 2, thumb=32, frame=2)
    assert image.size == layout.size
    for rank, want in enumerate((GREEN, RED)):
        left, top, _, _ = layout.box(0, 0, rank)
        ring, _ = _frame_and_centre(image, layout.box(0, 0, rank), 2)
        assert (ring == want).all()
        assert image.getpixel((left + 2 + 16, top + 2 + 4)) == CELL_BACKGROUND  # the empty cell, off its cross
    assert "huge.png (DecompressionBombError" in caplog.text and "broken.png (SyntaxError" in caplog.text


def test_bad_gallery_paths_are_refused_before_writing(tmp_path):
    rows = [GalleryRow(_solid(tmp_path, "q", (1, 2, 3)), [[]])]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_gallery(rows, tmp_path / "no" / "such" / "g.png")
    assert not (tmp_path / "no").exists()
    with pytest.raises(ValueError, match="image suffix"):
        check_gallery_path(tmp_path / "g.txt")
    with pytest.raises(ValueError, match="is a folder"):
        check_gallery_path(tmp_path)


def test_search_gallery_rows_take_labels_from_the_index():
    results = [
        {"query": "db/a.jpg", "results": [{"path": "db/a.jpg", "score": 1.0}, {"path": "db/b.jpg", "score": 0.5}]},
        {"query": "elsewhere/x.jpg", "results": [{"path": "db/c.jpg", "score": 0.7}]},
    ]
    rows = search_gallery_rows(results, ["db/a.jpg", "db/b.jpg", "db/c.jpg"], [3, 4, -1])
    assert rows[0].label == 3 and [h.label for h in rows[0].panels[0]] == [3, 4]
    assert [h.score for h in rows[0].panels[0]] == [1.0, 0.5]
    assert rows[1].label is None and rows[1].panels[0][0].label == -1


# ------------------------------------------------------------------------------------- raml search --gallery


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> dict:
    """own dataset ``mine`` (test: 3 classes x 3 images) indexed by a tiny network, which also queries."""
    base = tmp_path_factory.mktemp("gallery")
    root = base / "data"
    rng = np.random.default_rng(0)
    split_spec = {"train": [], "val": [], "test": []}
    for c in range(3):
        files = [f"images/test_{c}/{i}.jpg" for i in range(3)]
        for f in files:
            pixels = np.clip(np.array([80 * c, 120, 200 - 60 * c]) + rng.integers(-20, 21, (30, 40, 3)), 0, 255)
            (root / "mine" / f).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(root / "mine" / f)
        split_spec["test"].append(files)
    (root / "mine" / "split.json").write_text(json.dumps(split_spec))
    torch.manual_seed(0)
    net = base / "net.pth"
    save_checkpoint(net, build_network("timm/test_resnet", whitening=8, pretrained=False))
    index = base / "index"
    common = ["--workers", "0", "--no-progress", "--device", "cpu"]
    args = ["index", "--network-path", str(net), "--image-size", "32", "--data-root", str(root)]
    assert cli_main.main([*args, "--dataset", "mine-test", "--output", str(index), *common]) == 0
    return {"root": root, "net": net, "index": index, "split": get_split("mine-test", root), "common": common}


def test_search_gallery_frames_match_the_json_results(indexed, tmp_path, capsys):
    split = indexed["split"]
    label_of = {str(p): label for p, label in zip(split.abspaths(), split.labels)}
    outside = _solid(tmp_path, "outside", (128, 128, 128))
    queries = [str(split.abspaths()[0]), str(split.abspaths()[4]), outside]
    hits, gallery = tmp_path / "hits.json", tmp_path / "gallery.png"
    args = ["search", "--network-path", str(indexed["net"]), "--image-size", "32", "--index", str(indexed["index"])]
    code = cli_main.main(
        [*args, "--k", "4", "--json", str(hits), "--gallery", str(gallery), *queries, *indexed["common"]]
    )
    assert code == 0 and "gallery:" in capsys.readouterr().out
    results = json.loads(hits.read_text())
    image = Image.open(gallery).convert("RGB")
    layout = GalleryLayout(num_rows=3, num_panels=1, k=4)
    assert image.size == layout.size
    for row, entry in enumerate(results):
        query_label = label_of.get(entry["query"])  # the outside image has none
        assert len(entry["results"]) == 4
        for rank, hit in enumerate(entry["results"]):
            hit_label = label_of[hit["path"]]
            want = GREY if query_label is None else (GREEN if hit_label == query_label else RED)
            ring, _ = _frame_and_centre(image, layout.box(row, 0, rank), layout.frame)
            assert (ring == want).all(), (row, rank)
    # the first query is a database image: its own image comes first (green), and with k = 4 > 3 images per
    # class at least one hit is of another class (red)
    assert results[0]["results"][0]["path"] == queries[0]
    assert any(label_of[hit["path"]] != split.labels[0] for hit in results[0]["results"])


def test_search_gallery_into_a_missing_folder_writes_nothing(indexed, tmp_path, capsys):
    query = str(indexed["split"].abspaths()[0])
    hits = tmp_path / "hits.json"
    args = ["search", "--network-path", str(indexed["net"]), "--index", str(indexed["index"]), "--image-size", "32"]
    missing = tmp_path / "nope" / "gallery.png"
    code = cli_main.main([*args, "--json", str(hits), "--gallery", str(missing), query, *indexed["common"]])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not hits.exists() and not missing.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    same = tmp_path / "out.png"
    assert cli_main.main([*args, "--json", str(same), "--gallery", str(same), query, *indexed["common"]]) == 2
    assert "--json and --gallery name the same file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- the demo's gallery


def test_demo_gallery_rows_are_the_top_k_without_the_query_itself():
    generator = torch.Generator().manual_seed(0)
    n, d, k = 12, 6, 4
    database = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    teacher_q = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)
    student_q = torch.nn.functional.normalize(database + 0.1 * torch.randn(n, d, generator=generator), dim=1)
    labels = [i // 3 for i in range(n)]
    paths = [f"img{i}.jpg" for i in range(n)]
    ids = gallery_query_ids(labels, 3)
    assert ids == [0, 3, 6]  # the first image of classes 0, 1, 2 of 4
    assert gallery_query_ids(labels, 10) == [0, 3, 6, 9]  # fewer classes than asked: all of them
    rows = demo_gallery_rows(paths, labels, database, [teacher_q, student_q], ids, k)
    for row, q in zip(rows, ids):
        assert row.query == paths[q] and row.label == labels[q]
        for panel, queries in zip(row.panels, (teacher_q, student_q)):
            # explicit loop: score every other image, sort by score
            scored = []
            for j in range(n):
                if j != q:
                    scored.append((float(sum(database[j, c] * queries[q, c] for c in range(d))), j))
            scored.sort(key=lambda t: -t[0])
            assert [h.path for h in panel] == [paths[j] for _, j in scored[:k]]
            assert [h.label for h in panel] == [labels[j] for _, j in scored[:k]]
            assert [h.score for h in panel] == pytest.approx([s for s, _ in scored[:k]], abs=1e-6)


def test_the_documents_show_the_demo_gallery_they_describe():
    from raml.demo import GALLERY_K, GALLERY_QUERIES

    root = Path(__file__).resolve().parents[2]
    readme = root / "README.md"
    text = " ".join(readme.read_text().split())
    assert (GALLERY_QUERIES, GALLERY_K) == (4, 5)
    assert "four held-out queries at QR, each with its top-5" in text
    assert "(docs/images/demo_gallery.png)" in text
    picture = Image.open(root / "docs" / "images" / "demo_gallery.png")
    # four query rows of two five-result panels, as the demo draws them
    assert picture.format == "PNG" and picture.size == GalleryLayout(4, 2, 5).size


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, at open: over 89M pixels
def test_an_image_over_the_thumbnail_bound_is_an_empty_cell_never_decoded(tmp_path, monkeypatch, caplog):
    """A 12,000 x 12,000 PNG (under PIL's bomb limit; ~430 MB decoded) is refused from its header: no decoder runs
    on it, its cell is empty and the log says why; a small image beside it is still drawn."""
    big = _png(tmp_path / "big.png", 12000, 12000, [(b"IDAT", zlib.compress(b"\0" * 100))])  # a header only
    small = _solid(tmp_path, "a", (255, 0, 0))
    loaded: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def load(self):
        loaded.append(self.size)
        if self.size == (12000, 12000):
            raise AssertionError("the full image was decoded")
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", load)
    rows = [GalleryRow(small, [[Hit(big, 0), Hit(small, 0)]], 0)]
    image = render_gallery(rows, thumb=32, frame=2)
    assert (12000, 12000) not in loaded and loaded  # the small image was decoded, the big one never
    layout = GalleryLayout(1, 1, 2, thumb=32, frame=2)
    left, top, _, _ = layout.box(0, 0, 0)
    assert image.getpixel((left + 2 + 16, top + 2 + 4)) == CELL_BACKGROUND  # the empty cell, off its cross
    _, centre = _frame_and_centre(image, layout.box(0, 0, 1), 2)
    assert centre == (255, 0, 0)
    assert "big.png (ValueError: 12000x12000 pixels is over the 40,000,000 a thumbnail is decoded from" in caplog.text
