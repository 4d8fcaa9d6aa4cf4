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

Pinned digests (:class:`Digest`): each file's MD5 as published in other projects' download code, accepted only
where independent projects agree on the same value for the same file name (the dataset pages publish none):

- ``CUB_200_2011.tgz``: MD5 ``97eceeb196236b17998738112f37df78`` (TDeVries/cub2011_dataset,
  ContinualAI/avalanche).
- ``car_ims.tgz``: MD5 ``d5c8f0aa497503f355e17dc7886c3f14`` and ``cars_annos.mat``: MD5
  ``b407c6086d669747186bd1d764ff9dbc`` (KevinMusgrave/powerful-benchmarker, lenscloth/RKD).
- ``Stanford_Online_Products.zip``: MD5 ``7f73d41a2f44250d4779881525aea32e`` (KevinMusgrave/powerful-benchmarker,
  vadimkantorov/metriclearningbench).

``raml.data.download`` compares a file with its pinned digest before anything is unpacked.

Verification (:func:`verify_dataset`): the dataset's own loader reads its index files, and every image they
list must exist and pass the header check of :func:`raml.data.check.check_image`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from raml.data.archives import PlainFile, TarArchive, Unpacker, ZipArchive
from raml.data.splits import DATASETS, split_from_lists

logger = logging.getLogger(__name__)

MAX_LISTED = 10
"""Bad images named in an :class:`IncompleteDatasetError` message (the count is always given)."""


class IncompleteDatasetError(ValueError):
    """A dataset folder lacks index files or images, or holds images that cannot be read."""


DIGEST_HEX_LENGTHS: dict[str, int] = {"md5": 32, "sha1": 40, "sha256": 64}
"""The ``hashlib`` algorithms a pinned digest may use, and the length of their hex digests."""


@dataclass(frozen=True)
class Digest:
    """The published digest of a file.

    Attributes:
        algorithm: A ``hashlib`` name from :data:`DIGEST_HEX_LENGTHS` (``md5``, ``sha1``, ``sha256``).
        hex: The digest in lowercase hex.
        published_by: Where the value comes from (for error messages and the docs).
    """

    algorithm: str
    hex: str
    published_by: str

    def __post_init__(self) -> None:
        length = DIGEST_HEX_LENGTHS.get(self.algorithm)
        if length is None:
            raise ValueError(
                f"Expected a digest algorithm among {', '.join(DIGEST_HEX_LENGTHS)}, got {self.algorithm!r}."
            )
        if len(self.hex) != length or any(c not in "0123456789abcdef" for c in self.hex):
            raise ValueError(f"Expected a {self.algorithm} digest of {length} lowercase hex digits, got {self.hex!r}.")

    def describe(self) -> str:
        return f"{self.algorithm.upper()} {self.hex}"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a published dataset.

    Attributes:
        name: The official file name; the key of ``--url FILE=URL`` and the name under ``<data_root>/downloads``.
        url: The official address (the reference README's).
        unpacker: How the file lands in the dataset folder.
        digest: The file's published digest, compared before it is unpacked; None: not pinned (only its
            SHA-256 is recorded).
    """

    name: str
    url: str
    unpacker: Unpacker
    digest: Digest | None = None


@dataclass(frozen=True)
class DatasetSource:
    """A published dataset: its files, in the order they are fetched and unpacked."""

    name: str
    files: tuple[RemoteFile, ...]


_CUB_PUBLISHED_BY = "TDeVries/cub2011_dataset and ContinualAI/avalanche on GitHub"
_CARS_PUBLISHED_BY = "KevinMusgrave/powerful-benchmarker and lenscloth/RKD on GitHub"
_SOP_PUBLISHED_BY = "KevinMusgrave/powerful-benchmarker and vadimkantorov/metriclearningbench on GitHub"

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
                    Digest("md5", "97eceeb196236b17998738112f37df78", _CUB_PUBLISHED_BY),
                ),
            ),
        ),
        DatasetSource(
            "cars",
            (
                RemoteFile(
                    "car_ims.tgz",
                    "http://ai.stanford.edu/~jkrause/car196/car_ims.tgz",
                    TarArchive(),
                    Digest("md5", "d5c8f0aa497503f355e17dc7886c3f14", _CARS_PUBLISHED_BY),
                ),
                RemoteFile(
                    "cars_annos.mat",
                    "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat",
                    PlainFile(),
                    Digest("md5", "b407c6086d669747186bd1d764ff9dbc", _CARS_PUBLISHED_BY),
                ),
            ),
        ),
        DatasetSource(
            "sop",
            (
                RemoteFile(
                    "Stanford_Online_Products.zip",
                    "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                    ZipArchive(strip_prefix="Stanford_Online_Products/"),
                    Digest("md5", "7f73d41a2f44250d4779881525aea32e", _SOP_PUBLISHED_BY),
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
    from raml.data.check import scan_split  # here: it imports PIL and torch, which `raml data download -h` must not

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
