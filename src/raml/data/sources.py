"""Where the published datasets come from, how their files land in ``<data_root>/<name>``, and how to check
that a dataset folder is complete.

The files, addresses and layouts are those of the reference README's commands (``DOWNLOAD_COMMANDS`` in
``raml.data.splits``), so that a folder filled by ``raml data download`` equals one filled by hand:

- ``cub``: ``CUB_200_2011.tgz`` (members ``CUB_200_2011/...`` plus a top-level ``attributes.txt``) unpacked
  with ``--strip-components=1``: ``cub/images.txt``, ``cub/images/<NNN.Class>/...`` (``attributes.txt``,
  having a single component, is skipped as by tar).
- ``cars``: ``car_ims.tgz`` (members ``car_ims/NNNNNN.jpg``) unpacked as it is, and ``cars_annos.mat`` beside
  it: ``cars/car_ims/...``, ``cars/cars_annos.mat``.
- ``sop``: ``Stanford_Online_Products.zip`` (members ``Stanford_Online_Products/...``, from an FTP host)
  unpacked without that first folder: ``sop/Ebay_train.txt``, ``sop/Ebay_test.txt``, ``sop/<super>_final/...``.

Verification (:func:`verify_dataset`): the dataset's own loader reads its index files, and every image they
list must exist and pass the header check of :func:`raml.data.check.check_image`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from raml.data.archives import PlainFile, TarArchive, Unpacker, ZipArchive
from raml.data.check import scan_split
from raml.data.splits import DATASETS, split_from_lists

logger = logging.getLogger(__name__)

MAX_LISTED = 10
"""Bad images named in an :class:`IncompleteDatasetError` message (the count is always given)."""


class IncompleteDatasetError(ValueError):
    """A dataset folder lacks index files or images, or holds images that cannot be read."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a published dataset.

    Attributes:
        name: The official file name; the key of ``--url FILE=URL`` and the name under ``<data_root>/downloads``.
        url: The official address (the reference README's).
        unpacker: How the file lands in the dataset folder.
    """

    name: str
    url: str
    unpacker: Unpacker


@dataclass(frozen=True)
class DatasetSource:
    """A published dataset: its files, in the order they are fetched and unpacked."""

    name: str
    files: tuple[RemoteFile, ...]


SOURCES: dict[str, DatasetSource] = {
    source.name: source
    for source in (
        DatasetSource(
            "cub",
            (
                RemoteFile(
                    "CUB_200_2011.tgz",
                    "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                    TarArchive(strip_components=1),
                ),
            ),
        ),
        DatasetSource(
            "cars",
            (
                RemoteFile("car_ims.tgz", "http://ai.stanford.edu/~jkrause/car196/car_ims.tgz", TarArchive()),
                RemoteFile("cars_annos.mat", "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat", PlainFile()),
            ),
        ),
        DatasetSource(
            "sop",
            (
                RemoteFile(
                    "Stanford_Online_Products.zip",
                    "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                    ZipArchive(strip_prefix="Stanford_Online_Products/"),
                ),
            ),
        ),
    )
}
"""The datasets ``raml data download`` knows: name -> files."""


def get_source(name: str) -> DatasetSource:
    """The published dataset ``name``; an unknown name is an error listing the known ones."""
    if name not in SOURCES:
        raise ValueError(f"Unknown dataset {name!r} to download; known: {', '.join(SOURCES)}.")
    return SOURCES[name]


@dataclass(frozen=True)
class DatasetCounts:
    """What a verified dataset folder holds (classes and images of its train + val and test parts)."""

    images: int
    classes: int
    trainval_images: int
    trainval_classes: int
    test_images: int
    test_classes: int

    def describe(self) -> str:
        return (
            f"{self.images} images of {self.classes} classes (train + val: {self.trainval_images} images of "
            f"{self.trainval_classes} classes; test: {self.test_images} images of {self.test_classes} classes)"
        )


def verify_dataset(name: str, folder: Path, workers: int = 1, progress: bool = False) -> DatasetCounts:
    """Check that every image listed by the index files of dataset ``name`` in ``folder`` is usable.

    Args:
        name: A registered dataset (``cub``, ``cars``, ``sop``).
        folder: The dataset folder (``<data_root>/<name>``, or a staging folder laid out the same way).
        workers: Threads checking image headers.
        progress: Show a progress bar.

    Returns:
        The counts of images and classes.

    Raises:
        IncompleteDatasetError: An index file is missing or malformed, or images are missing or unreadable;
            the message names the first few and gives the count.
    """
    try:
        parts = DATASETS[name](folder, 0.5)
    except (FileNotFoundError, ValueError) as error:
        raise IncompleteDatasetError(f"{folder} is not a complete {name!r} dataset: {error}") from error
    trainval = [*parts.get("train", []), *parts.get("val", [])]
    test = parts.get("test", [])
    classes = trainval + test
    try:
        everything = split_from_lists(f"{name}-all", folder, classes)
    except ValueError as error:
        raise IncompleteDatasetError(f"{folder} is not a complete {name!r} dataset: {error}") from error
    bad = scan_split(everything, workers=workers, progress=progress)
    if bad:
        listed = "\n".join(f"  {b.path}: {b.reason}" for b in bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise IncompleteDatasetError(
            f"{folder}: {len(bad)} of the {len(everything)} images its index files list are missing or unreadable:"
            f"\n{listed}{more}"
        )
    return DatasetCounts(
        images=len(everything),
        classes=len(classes),
        trainval_images=sum(len(c) for c in trainval),
        trainval_classes=len(trainval),
        test_images=sum(len(c) for c in test),
        test_classes=len(test),
    )
