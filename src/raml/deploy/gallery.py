"""Retrieval galleries: one row per query, the query's image then its top-k database images as thumbnails.

Contract: ``render_gallery(rows, ...)`` -> a ``PIL.Image`` (RGB); ``write_gallery(rows, path, ...)`` writes it.
A row is a :class:`GalleryRow`: the query (path, label) and one or more *panels*, each a ranked list of
:class:`Hit` (path, label, score). Several panels side by side compare query networks on the same query
(e.g. the undistilled teacher and the distilled student at the query size, against one database).

Every image sits in a square cell of ``thumb`` pixels (resized to fit, aspect kept, centred on a light grey
background) inside a frame of ``frame`` pixels: the query's frame is :data:`QUERY_COLOR`; a hit's frame is
:data:`SAME_LABEL_COLOR` (green) when it has the query's label, :data:`OTHER_LABEL_COLOR` (red) when it has
another, and :data:`UNKNOWN_LABEL_COLOR` (grey) when either label is unknown (``None`` or negative). Under
each hit: its rank and score. :class:`GalleryLayout` gives the pixel position of every cell, so that callers
and tests can find them. Drawing uses Pillow only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from raml.utils import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "OTHER_LABEL_COLOR",
    "QUERY_COLOR",
    "SAME_LABEL_COLOR",
    "UNKNOWN_LABEL_COLOR",
    "MAX_THUMBNAIL_SOURCE_PIXELS",
    "GalleryLayout",
    "GalleryRow",
    "Hit",
    "check_gallery_path",
    "frame_color",
    "render_gallery",
    "search_gallery_rows",
    "write_gallery",
]

Color = tuple[int, int, int]

SAME_LABEL_COLOR: Color = (30, 160, 60)
OTHER_LABEL_COLOR: Color = (215, 40, 40)
UNKNOWN_LABEL_COLOR: Color = (150, 150, 150)
QUERY_COLOR: Color = (40, 90, 200)
BACKGROUND: Color = (255, 255, 255)
CELL_BACKGROUND: Color = (235, 235, 235)
TEXT_COLOR: Color = (20, 20, 20)
#: The most pixels an image is decoded with to draw its thumbnail (after a JPEG's reduced-size decoding, see
#: ``Image.draft``); a larger one (e.g. a 12,000 x 12,000 PNG: ~430 MB and seconds to decode, though under PIL's
#: decompression-bomb limit) is drawn as an empty cell, with a warning, from its header alone.
MAX_THUMBNAIL_SOURCE_PIXELS = 40_000_000


@dataclass(frozen=True)
class Hit:
    """One retrieved database image: its path, class label (None or < 0 when unknown) and score."""

    path: str
    label: int | None = None
    score: float | None = None


@dataclass(frozen=True)
class GalleryRow:
    """A query and its ranked results, one list per panel (all panels of a gallery show the same k)."""

    query: str
    panels: Sequence[Sequence[Hit]]
    label: int | None = None


def _known(label: int | None) -> bool:
    return label is not None and int(label) >= 0


def frame_color(query_label: int | None, hit_label: int | None) -> Color:
    """Green for the query's label, red for another, grey when either is unknown."""
    if not (_known(query_label) and _known(hit_label)):
        return UNKNOWN_LABEL_COLOR
    return SAME_LABEL_COLOR if int(query_label) == int(hit_label) else OTHER_LABEL_COLOR  # type: ignore[arg-type]


@dataclass(frozen=True)
class GalleryLayout:
    """Pixel geometry of a gallery with ``num_rows`` rows of a query cell and ``num_panels`` x ``k`` hit cells.

    Columns, left to right: the query, then per panel ``k`` hits (``panel_gap`` pixels before each panel).
    A cell is ``thumb + 2 * frame`` pixels square; ``caption`` pixels of text below it; ``header`` pixels of
    panel titles above the first row.
    """

    num_rows: int
    num_panels: int
    k: int
    thumb: int = 96
    frame: int = 4
    gap: int = 4
    panel_gap: int = 20
    margin: int = 8
    header: int = 18
    caption: int = 14

    @property
    def cell(self) -> int:
        """Side of a framed cell."""
        return self.thumb + 2 * self.frame

    def column_x(self, panel: int | None, rank: int = 0) -> int:
        """Left edge of the query cell (``panel`` None) or of the hit ``rank`` (0-based) of ``panel``."""
        if panel is None:
            return self.margin
        panel_width = self.k * self.cell + (self.k - 1) * self.gap
        first = self.margin + self.cell + self.panel_gap
        return first + panel * (panel_width + self.panel_gap) + rank * (self.cell + self.gap)

    def row_y(self, row: int) -> int:
        """Top edge of the cells of ``row``."""
        return self.margin + self.header + row * (self.cell + self.caption + self.gap)

    def box(self, row: int, panel: int | None, rank: int = 0) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of a framed cell, right/bottom exclusive."""
        x, y = self.column_x(panel, rank), self.row_y(row)
        return x, y, x + self.cell, y + self.cell

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the whole image."""
        width = self.column_x(self.num_panels - 1, self.k - 1) + self.cell + self.margin if self.num_panels else 0
        width = max(width, self.margin * 2 + self.cell)
        height = self.row_y(self.num_rows) - self.gap + self.margin
        return width, height


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _thumbnail(path: str, thumb: int) -> Image.Image:
    """The image fitted into ``thumb`` x ``thumb`` (aspect kept), or a grey square with a cross if unreadable or
    larger than :data:`MAX_THUMBNAIL_SOURCE_PIXELS` (checked from its header, before any decoding)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (thumb, thumb))  # JPEG: decode at a reduced size when much larger
            width, height = image.size  # the header's (a JPEG's after draft): nothing is decoded yet
            if width * height > MAX_THUMBNAIL_SOURCE_PIXELS:
                raise ValueError(
                    f"{width}x{height} pixels is over the {MAX_THUMBNAIL_SOURCE_PIXELS:,} a thumbnail is decoded "
                    "from (a JPEG is decoded at a reduced size; other formats in full); not decoded"
                )
            rgb = image.convert("RGB")
        return ImageOps.pad(rgb, (thumb, thumb), Image.Resampling.LANCZOS, color=CELL_BACKGROUND)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        logger.warning("Gallery: cannot read %s (%s: %s); drawing an empty cell.", path, type(error).__name__, error)
        cell = Image.new("RGB", (thumb, thumb), CELL_BACKGROUND)
        draw = ImageDraw.Draw(cell)
        draw.line((0, 0, thumb - 1, thumb - 1), fill=UNKNOWN_LABEL_COLOR, width=2)
        draw.line((0, thumb - 1, thumb - 1, 0), fill=UNKNOWN_LABEL_COLOR, width=2)
        return cell


def _paste_framed(canvas: Image.Image, box: tuple[int, int, int, int], image: Image.Image, color: Color, frame: int):
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=color)
    canvas.paste(image, (box[0] + frame, box[1] + frame))


def render_gallery(
    rows: Sequence[GalleryRow],
    panel_titles: Sequence[str] | None = None,
    thumb: int = 96,
    frame: int = 4,
) -> Image.Image:
    """Draw ``rows`` (see the module docstring for the layout and colours).

    Args:
        rows: The queries and their results; every row has the same number of panels.
        panel_titles: One title per panel, written above it (default: none).
        thumb: Side of a thumbnail in pixels.
        frame: Width of the coloured frame around each thumbnail.

    Returns:
        The gallery as an RGB image.

    Raises:
        ValueError: No rows, rows with different numbers of panels, or the wrong number of titles.
    """
    if not rows:
        raise ValueError("A gallery needs at least one query row.")
    num_panels = len(rows[0].panels)
    if num_panels < 1 or any(len(r.panels) != num_panels for r in rows):
        raise ValueError("Every gallery row needs the same number (at least one) of result panels.")
    if panel_titles is not None and len(panel_titles) != num_panels:
        raise ValueError(f"Got {len(panel_titles)} panel titles for {num_panels} panels.")
    if thumb < 8 or frame < 1:
        raise ValueError(f"thumb must be at least 8 pixels and frame at least 1, got {thumb} and {frame}.")
    k = max(1, max(len(hits) for r in rows for hits in r.panels))
    layout = GalleryLayout(len(rows), num_panels, k, thumb=thumb, frame=frame)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    draw.text((layout.margin, layout.margin), "query", fill=TEXT_COLOR, font=font)
    for p, title in enumerate(panel_titles or ()):
        draw.text((layout.column_x(p), layout.margin), title, fill=TEXT_COLOR, font=font)
    for i, row in enumerate(rows):
        _paste_framed(canvas, layout.box(i, None), _thumbnail(row.query, thumb), QUERY_COLOR, frame)
        if _known(row.label):
            left, _, _, bottom = layout.box(i, None)
            draw.text((left, bottom + 1), f"label {row.label}", fill=TEXT_COLOR, font=font)
        for p, hits in enumerate(row.panels):
            for rank, hit in enumerate(hits):
                box = layout.box(i, p, rank)
                _paste_framed(canvas, box, _thumbnail(hit.path, thumb), frame_color(row.label, hit.label), frame)
                caption = f"{rank + 1}" + (f"  {hit.score:.3f}" if hit.score is not None else "")
                draw.text((box[0], box[3] + 1), caption, fill=TEXT_COLOR, font=font)
    return canvas


def check_gallery_path(path: str | Path) -> Path:
    """Check that a gallery can be written at ``path`` (its folder exists, a known image suffix) before any work.

    Raises:
        FileNotFoundError: The folder does not exist.
        ValueError: The suffix is not an image format Pillow writes, or ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        example = str(path / "gallery.png")
        raise ValueError(f"Gallery path {str(path)!r} is a folder; give a file name such as {example!r}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"The folder of the gallery file {str(path)!r} does not exist; create {str(path.parent)!r} first or "
            "choose another path."
        )
    suffix = path.suffix.lower()
    if Image.registered_extensions().get(suffix) not in Image.SAVE:
        raise ValueError(f"Gallery path {str(path)!r} needs an image suffix such as .png or .jpg, got {suffix!r}.")
    return path


def write_gallery(
    rows: Sequence[GalleryRow],
    path: str | Path,
    panel_titles: Sequence[str] | None = None,
    thumb: int = 96,
    frame: int = 4,
) -> Path:
    """Render ``rows`` (:func:`render_gallery`) and write the image atomically at ``path`` (format from its suffix).

    Raises:
        FileNotFoundError, ValueError: See :func:`check_gallery_path` and :func:`render_gallery`; nothing is
            written then.
    """
    path = check_gallery_path(path)
    image = render_gallery(rows, panel_titles, thumb=thumb, frame=frame)
    image_format = Image.registered_extensions()[path.suffix.lower()]
    with atomic_path(path) as tmp:
        image.save(tmp, format=image_format)
    logger.info("Wrote a gallery of %d queries to %s", len(rows), path)
    return path


def search_gallery_rows(
    results: Sequence[dict[str, Any]],
    database_paths: Sequence[str],
    database_labels: Sequence[int],
    key: Callable[[str], str] = str,
) -> list[GalleryRow]:
    """Gallery rows from ``raml search`` results (``[{"query": path, "results": [{"path", "score"}, ...]}]``).

    A hit's label is the database label stored for its path; a query's label is the database label of the same
    image when the query is itself in the database (a split indexed with its labels), unknown otherwise.

    Args:
        results: Search results, as :func:`raml.deploy.search.search_images` returns them.
        database_paths: The index's N paths.
        database_labels: Their N labels (-1 where unknown).
        key: Maps a path to its identity (e.g. the index's normalised absolute path), for both sides.
    """
    label_of = {key(str(p)): int(label) for p, label in zip(database_paths, database_labels)}
    rows = []
    for entry in results:
        hits = [Hit(hit["path"], label_of.get(key(hit["path"])), hit.get("score")) for hit in entry["results"]]
        rows.append(GalleryRow(entry["query"], [hits], label_of.get(key(entry["query"]))))
    return rows
