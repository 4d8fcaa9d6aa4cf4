"""Hand-mutation survivor of raml.deploy.gallery, now killed: the gallery's width follows the longest result list
of any row, not of the first (a later row's last hits would be drawn off the image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from raml.deploy.gallery import OTHER_LABEL_COLOR, GalleryLayout, GalleryRow, Hit, render_gallery


def test_a_later_row_with_more_hits_than_the_first_fits_in_the_gallery(tmp_path: Path):
    image_path = tmp_path / "a.png"
    Image.new("RGB", (20, 20), (0, 200, 200)).save(image_path)
    path = str(image_path)
    rows = [
        GalleryRow(path, [[Hit(path, 1, 0.9)]], 1),
        GalleryRow(path, [[Hit(path, 2, 0.9), Hit(path, 2, 0.8), Hit(path, 2, 0.7)]], 1),
    ]
    image = render_gallery(rows, thumb=16, frame=2)
    layout = GalleryLayout(num_rows=2, num_panels=1, k=3, thumb=16, frame=2)
    assert image.size == layout.size
    left, top, right, bottom = layout.box(1, 0, 2)  # the last hit of the second row: a red frame, all of it
    pixels = np.asarray(image)
    assert (pixels[top:bottom, left : left + 2] == OTHER_LABEL_COLOR).all()
    assert (pixels[top:bottom, right - 2 : right] == OTHER_LABEL_COLOR).all()
