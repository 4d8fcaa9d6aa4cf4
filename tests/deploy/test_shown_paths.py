"""What a client of ``raml serve`` is shown of a database image's server path (raml.deploy.service.shown_paths)."""

from __future__ import annotations

import gc
import os

from raml.deploy.service.shown_paths import DatabaseRoots, database_root, shown_name


class _Index:
    """What DatabaseRoots reads of a DatabaseIndex: its paths (and a weak reference to it)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths


def _index(paths: list[str]) -> _Index:
    return _Index(paths)


def test_paths_are_shown_below_the_folder_holding_every_image():
    index = _index(["/data/cub/images/001.A/a.jpg", "/data/cub/images/002.B/b.jpg", ""])  # "": a removed row
    roots = DatabaseRoots()
    assert roots.root(index) == database_root(index.paths) == "/data/cub/images"
    assert [roots.shown(index, i) for i in range(2)] == ["001.A/a.jpg", "002.B/b.jpg"]
    assert roots.shown(_index(["images/a.jpg"]), 0) == "images/a.jpg"  # stored relative: shown as stored
    assert shown_name("/srv/nets/student.pth") == "student.pth" and shown_name(None) is None


def test_images_under_unrelated_trees_show_their_folder_and_name_not_a_path_below_the_root():
    """Appending images from another tree makes the common folder the file system's root: a path relative to it
    was the absolute path less its first slash ('home/alice/private/cub/001/a.jpg')."""
    index = _index(["/home/alice/private/cub/001/a.jpg", "/mnt/nas2/datasets/extra/b.jpg"])
    roots = DatabaseRoots()
    assert roots.root(index) == os.sep
    assert [roots.shown(index, i) for i in range(2)] == ["001/a.jpg", "extra/b.jpg"]


def test_a_collected_index_is_forgotten():
    roots = DatabaseRoots()
    index = _index(["/data/a/x.jpg", "/data/b/y.jpg"])
    assert roots.root(index) == "/data"
    del index
    gc.collect()
    assert roots._roots == {}
