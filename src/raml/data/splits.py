"""Dataset splits: a dataset name -> ordered image paths + class labels.

Contract: ``get_split(name, data_root, val_ratio)`` -> :class:`Split` with ``paths`` relative to the dataset
folder ``root`` (class by class, each class's images in index-file order) and ``labels`` in ``0..C-1`` (the
class index within the split, in class order). Class order is the order in which classes first appear in
the dataset's own index files.

Name grammar (``BASE`` selects the train part):

- ``BASE``, ``BASE-val``, ``BASE-test``, ``BASE-trainval`` (train classes first, then val classes; used for
  the final training after a hyper-parameter search). ``BASE-train`` is accepted as a synonym of ``BASE``.
- ``BASE`` is a registered dataset (``cub``, ``cars``, ``sop``; see :func:`register_dataset`), or an own
  dataset folder ``<data_root>/<BASE>`` holding a ``split.json``, or a folder-per-class layout
  ``<data_root>/<BASE>/{train,val,test}/<class>/<image>`` (``val`` and ``test`` optional).
- ``path/to/split.json`` or ``path/to/split.json:PART`` (PART one of train, val, test, trainval; default
  train) loads that split file; its paths are relative to the JSON file's folder.

A split dict (the format of ``split.json`` and of every registered loader's result) is
``{"train": [[paths of class 1], [paths of class 2], ...], "val": [...], "test": [...]}``; a missing part
is an empty list.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from raml.data.mat_structure import MatStructureError, check_declared_sizes

logger = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
"""The parts a split dict may hold."""
SPLIT_SUFFIXES = ("train", "val", "test", "trainval")
"""The parts a split name may select (``trainval`` = train classes followed by val classes)."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""Image file extensions recognised in folder-per-class layouts (compared case-insensitively)."""
SPLIT_FILE_NAME = "split.json"
MAX_MAT_BYTES = 64 << 20
"""Most bytes ``cars_annos.mat`` may hold with its compressed elements inflated, checked by streaming before
``scipy.io`` reads it (a file of the real structure with 16,185 annotations holds 6.4 MiB)."""
MAX_CARS_ANNOTATIONS = 100_000
"""Most entries the ``annotations`` struct array of ``cars_annos.mat`` may declare (Cars196 has 16,185)."""
_MAT_COMPRESSED = 15
"""The MAT 5 data type of a zlib-compressed element (``miCOMPRESSED``)."""
_CARS_SOURCE = "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat"

SplitDict = dict[str, list[list[str]]]
SplitLoader = Callable[[Path, float], SplitDict]

DOWNLOAD_COMMANDS: dict[str, str] = {
    "cub": (
        "wget https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz\n"
        "mkdir -p data/cub && tar -xf CUB_200_2011.tgz -C data/cub --strip-components=1\n"
        "rm CUB_200_2011.tgz"
    ),
    "cars": (
        "mkdir -p data/cars && cd $_\n"
        "wget http://ai.stanford.edu/~jkrause/car196/car_ims.tgz\n"
        "wget http://ai.stanford.edu/~jkrause/car196/cars_annos.mat\n"
        "tar -xf car_ims.tgz && rm car_ims.tgz"
    ),
    "sop": (
        "wget ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip -P data/sop\n"
        "cd data/sop && ln -s . Stanford_Online_Products && unzip Stanford_Online_Products.zip\n"
        "rm Stanford_Online_Products && rm Stanford_Online_Products.zip"
    ),
}
"""Download commands of the published datasets (from the reference README; ``data`` is the data root)."""

EXPECTED_LAYOUTS: dict[str, str] = {
    "cub": "<data_root>/cub/images.txt and <data_root>/cub/images/<NNN.Class_name>/<file>.jpg",
    "cars": "<data_root>/cars/cars_annos.mat and <data_root>/cars/car_ims/<NNNNNN>.jpg",
    "sop": ("<data_root>/sop/Ebay_train.txt, <data_root>/sop/Ebay_test.txt and <data_root>/sop/<super>_final/*.JPG"),
}

OWN_DATA_HELP = (
    "To use your own data, either (a) put a split file at <data_root>/<NAME>/split.json of the form "
    '{"train": [[class 1 paths], [class 2 paths], ...], "val": [...], "test": [...]} with paths relative '
    "to <data_root>/<NAME>, (b) lay out images as <data_root>/<NAME>/{train,val,test}/<class>/<image> "
    "(val and test optional), (c) pass the path of a split file as the name (my/split.json or "
    "my/split.json:test; paths relative to the JSON's folder), or (d) call "
    "raml.data.register_dataset(NAME, loader) from Python."
)


class DatasetNotFoundError(FileNotFoundError):
    """A data root, dataset folder, index file or split file does not exist (or the name is unknown)."""


@dataclass(frozen=True)
class Split:
    """One part of a dataset: ordered image paths and their class labels.

    Attributes:
        name: The split's name, e.g. ``"cub-test"``.
        root: The dataset folder; ``paths`` are relative to it.
        paths: Image paths relative to ``root``, class by class, each class's images in index-file order.
        labels: Class index within the split (``0..C-1``, in class order), one per path.
    """

    name: str
    root: Path
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(
                f"Split {self.name!r}: {len(self.paths)} paths but {len(self.labels)} labels; "
                "pass exactly one label per path."
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of distinct classes (labels are ``0..num_classes-1``)."""
        return len(set(self.labels))

    def abspaths(self) -> list[Path]:
        """Image paths joined with ``root`` (absolute paths, where allowed, are kept as they are)."""
        return [self.root / p for p in self.paths]

    def classes(self) -> list[list[int]]:
        """Indices into ``paths`` of each class's images, in class order."""
        out: list[list[int]] = [[] for _ in range(self.num_classes)]
        for i, label in enumerate(self.labels):
            out[label].append(i)
        return out


DATASETS: dict[str, SplitLoader] = {}
"""Registered dataset loaders: name -> ``loader(dataset_folder, val_ratio) -> split dict``."""


def register_dataset(name: str, loader: SplitLoader) -> SplitLoader:
    """Register a loader under ``name`` so that ``get_split(name, ...)`` uses it.

    The dataset folder is ``<data_root>/<name>``; the loader receives it and the validation ratio and
    returns the full split dict (paths relative to the folder).

    Args:
        name: Dataset name; must not end in ``-train``, ``-val``, ``-test`` or ``-trainval`` (those select
            parts) and must not contain a path separator or ``:``.
        loader: ``loader(dataset_folder, val_ratio) -> {"train": [...], "val": [...], "test": [...]}``.

    Returns:
        The loader (so this can also decorate a function via ``functools.partial``).
    """
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or ":" in name:
        raise ValueError(f"Dataset name must be a non-empty string without '/', '\\' or ':'; got {name!r}.")
    if any(name.endswith(f"-{s}") for s in SPLIT_SUFFIXES):
        raise ValueError(
            f"Dataset name {name!r} ends in a part suffix ({', '.join('-' + s for s in SPLIT_SUFFIXES)}); "
            "choose a name without it."
        )
    if not callable(loader):
        raise TypeError(f"loader for {name!r} must be callable (folder, val_ratio) -> split dict; got {loader!r}.")
    if name in DATASETS:
        logger.warning("Replacing the registered loader of dataset %r.", name)
    DATASETS[name] = loader
    return loader


# --------------------------------------------------------------------------------------------------- helpers


def _not_found(what: str, path: Path, dataset: str | None) -> DatasetNotFoundError:
    lines = [f"{what} not found: {path}"]
    if what == "Data root":
        lines.append("Pass the folder that holds your datasets as data_root (--data-root on the command line).")
    if dataset in EXPECTED_LAYOUTS:
        lines.append(f"Expected layout for {dataset!r}: {EXPECTED_LAYOUTS[dataset]}")
    if dataset in DOWNLOAD_COMMANDS:
        lines.append(
            f"Download it with 'raml data download {dataset} --data-root <data_root>', or by hand (run from the "
            f"folder above a data root named 'data', or adapt the paths):\n{DOWNLOAD_COMMANDS[dataset]}"
        )
    return DatasetNotFoundError("\n".join(lines))


def _split_ratio(classes: list[list[str]], val_ratio: float) -> tuple[list[list[str]], list[list[str]]]:
    n_train = round(len(classes) * (1.0 - val_ratio))
    return classes[:n_train], classes[n_train:]


def _halves(classes: list[list[str]], source: Path) -> tuple[list[list[str]], list[list[str]]]:
    if len(classes) % 2:
        raise ValueError(
            f"{source} lists {len(classes)} classes, an odd number; the first half of the classes is used "
            "for training and the second half for testing, so the count must be even."
        )
    half = len(classes) // 2
    return classes[:half], classes[half:]


def _group_in_order(items: list[tuple[object, str]]) -> list[list[str]]:
    """Group ``(class_key, path)`` pairs by class, classes in order of first appearance."""
    groups: dict[object, list[str]] = {}
    for key, path in items:
        groups.setdefault(key, []).append(path)
    return list(groups.values())


def _require_file(path: Path, dataset: str) -> None:
    if not path.is_file():
        raise _not_found(f"Index file of dataset {dataset!r}", path, dataset)


# --------------------------------------------------------------------------------------------------- loaders


def _read_index_text(index: Path) -> io.StringIO:
    """A dataset's index file as UTF-8 text, its lines read as ``open(index, encoding="utf-8")`` reads them
    (universal newlines).

    Raises:
        ValueError: The file is not UTF-8, naming the file, the line and the byte (a decoding error of the stream
            would name only a position in its buffer).
    """
    data = index.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = len((data[: exc.start] + b"x").splitlines())
        raise ValueError(
            f"{index}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}: {exc.reason}). Save the file as "
            "UTF-8 (e.g. 'iconv -f latin1 -t utf-8') or download the dataset again."
        ) from exc
    return io.StringIO(text, newline=None)


def load_cub(folder: Path, val_ratio: float) -> SplitDict:
    """CUB-200-2011: ``images.txt`` lines ``<id> <NNN.Class>/<file>``; images under ``images/``.

    Classes (keyed by the number before the first '.' of the folder name, in order of first appearance) are
    halved: the first half is train + val (the first ``round(n * (1 - val_ratio))`` train, the rest val), the
    second half test. Real CUB: classes 1-100 train + val, 101-200 test.
    """
    index = folder / "images.txt"
    _require_file(index, "cub")
    items: list[tuple[object, str]] = []
    with _read_index_text(index) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[0].isdigit():
                raise ValueError(
                    f"{index}, line {lineno}: expected '<image id> <class folder>/<file>', got {line.rstrip()!r}."
                )
            rel = fields[1]
            class_folder, sep, _ = rel.partition("/")
            number = class_folder.split(".", 1)[0]
            if not sep or not number.isdigit():
                raise ValueError(
                    f"{index}, line {lineno}: expected a path '<NNN.Class_name>/<file>' whose folder starts "
                    f"with the class number, got {rel!r}."
                )
            items.append((int(number), f"images/{rel}"))
    trainval, test = _halves(_group_in_order(items), index)
    train, val = _split_ratio(trainval, val_ratio)
    return {"train": train, "val": val, "test": test}


def _mat_value(x: object) -> object:
    """Unwrap the nested 1x1 arrays that ``scipy.io.loadmat`` produces around scalars and strings."""
    import numpy as np

    while isinstance(x, np.ndarray):
        if x.size != 1:
            raise ValueError(f"expected a single value, got an array of shape {x.shape}")
        x = x.reshape(-1)[0]
    return x.item() if isinstance(x, np.generic) else x


def _mat_inflated_bytes(index: Path, limit: int) -> int:
    """Size of a MAT 5 file with its compressed elements inflated, counted by streaming them through zlib (at
    most 1 MiB of output held at a time) and stopping once past ``limit``. A file without a MAT 5 header (MAT 4,
    which is never compressed, or not a MAT file) counts as its size: ``scipy.io`` then says what is wrong."""
    with open(index, "rb") as f:
        header = f.read(128)
        if len(header) < 128 or header[126:128] not in (b"IM", b"MI"):
            return index.stat().st_size
        order = "<" if header[126:128] == b"IM" else ">"
        total = len(header)
        while total <= limit and len(tag := f.read(8)) == 8:
            data_type, size = struct.unpack(order + "II", tag)
            total += 8
            if data_type >> 16:  # a small element: its data is inside the tag
                continue
            if data_type != _MAT_COMPRESSED:
                total += size
                f.seek(size, os.SEEK_CUR)
                continue
            inflater, left = zlib.decompressobj(), size
            while left > 0 and total <= limit and (chunk := f.read(min(left, 1 << 16))):
                left -= len(chunk)
                while chunk and total <= limit:
                    try:
                        total += len(inflater.decompress(chunk, 1 << 20))
                    except zlib.error as exc:
                        raise ValueError(
                            f"{index}: cannot read it as a MATLAB file (a compressed element is damaged: {exc}). "
                            f"Delete it and download it again from {_CARS_SOURCE}."
                        ) from exc
                    chunk = inflater.unconsumed_tail
        return total


#: the ``cars_annos.mat`` files that passed :func:`_check_cars_mat` in this process: (path, size, mtime in ns)
_CHECKED_MATS: set[tuple[str, int, int]] = set()


def _check_cars_mat(index: Path) -> None:
    """Refuse a ``cars_annos.mat`` that would take more than a bounded memory and time to load: more than
    :data:`MAX_MAT_BYTES` once inflated, or an ``annotations`` variable that is not a struct array of at most
    :data:`MAX_CARS_ANNOTATIONS` entries (``scipy.io.whosmat`` inflates each variable's first element, so the
    size is checked first)."""
    import scipy.io

    inflated = _mat_inflated_bytes(index, MAX_MAT_BYTES)
    if inflated > MAX_MAT_BYTES:
        raise ValueError(
            f"{index}: holds more than {MAX_MAT_BYTES >> 20} MiB once decompressed ({index.stat().st_size} bytes "
            f"on disk); expected the Cars196 annotation file, which holds about 6.4 MiB. Refusing to load it (a "
            f"damaged or forged file, a decompression bomb?). Delete it and download it again from {_CARS_SOURCE}."
        )
    try:  # a cell or struct inside 'annotations' declaring billions of entries: scipy allocates them first
        check_declared_sizes(index, MAX_MAT_BYTES)
    except MatStructureError as error:
        raise MatStructureError(
            f"{error}: a damaged or forged file, refused before loading it; expected the Cars196 annotation file. "
            f"Delete it and download it again from {_CARS_SOURCE}."
        ) from error
    try:
        variables = scipy.io.whosmat(str(index))
    except Exception as exc:  # scipy raises several types for broken files
        raise ValueError(f"{index}: cannot read it as a MATLAB file ({type(exc).__name__}: {exc}).") from exc
    found = {name: (shape, kind) for name, shape, kind in variables}
    if "annotations" not in found:
        raise ValueError(
            f"{index}: no 'annotations' variable (found {sorted(found)}); expected the Cars196 annotation file. "
            f"Delete it and download it again from {_CARS_SOURCE}."
        )
    shape, kind = found["annotations"]
    entries = 1
    for n in shape:
        entries *= n
    if kind != "struct" or entries > MAX_CARS_ANNOTATIONS:
        raise ValueError(
            f"{index}: 'annotations' is a {kind} array of shape {shape}; expected a struct array of at most "
            f"{MAX_CARS_ANNOTATIONS} entries (Cars196 has 16,185). Refusing to load it. Delete the file and "
            f"download it again from {_CARS_SOURCE}."
        )


def load_cars(folder: Path, val_ratio: float) -> SplitDict:
    """Cars196: ``cars_annos.mat`` struct array ``annotations`` (``relative_im_path``, ``class``, ...).

    Classes in order of first appearance are halved: the first half (98 on the real data) is train + val
    (the first ``round(n * (1 - val_ratio))`` train, the rest val), the second half test. The ``test`` flag
    and the bounding boxes are not used.
    """
    import numpy as np
    import scipy.io

    index = folder / "cars_annos.mat"
    _require_file(index, "cars")
    stamp = index.stat()
    key = (str(index.resolve()), stamp.st_size, stamp.st_mtime_ns)
    if key not in _CHECKED_MATS:  # ~1 s for Cars196's file: once a process, and again only if the file changes
        _check_cars_mat(index)  # memory and time bounded before scipy inflates anything
        _CHECKED_MATS.add(key)
    try:
        mat = scipy.io.loadmat(str(index), variable_names=["annotations"])
    except Exception as exc:  # scipy raises several types for broken files
        raise ValueError(f"{index}: cannot read it as a MATLAB file ({type(exc).__name__}: {exc}).") from exc
    annos = np.asarray(mat["annotations"])
    names = annos.dtype.names or ()
    for field in ("relative_im_path", "class"):
        if field not in names:
            raise ValueError(f"{index}: 'annotations' has no field {field!r} (fields: {list(names)}).")
    items: list[tuple[object, str]] = []
    for i, record in enumerate(annos.reshape(-1), start=1):
        try:
            rel = _mat_value(record["relative_im_path"])
            cls = _mat_value(record["class"])
        except ValueError as exc:
            raise ValueError(f"{index}, annotation {i}: {exc}.") from exc
        if (
            not isinstance(rel, str)
            or not isinstance(cls, int | float)
            or (isinstance(cls, float) and not math.isfinite(cls))  # int() of inf or nan raises, naming nothing
            or int(cls) != cls
        ):
            raise ValueError(
                f"{index}, annotation {i}: expected a string relative_im_path and an integer class, "
                f"got {rel!r} and {cls!r}."
            )
        items.append((int(cls), rel))
    trainval, test = _halves(_group_in_order(items), index)
    train, val = _split_ratio(trainval, val_ratio)
    return {"train": train, "val": val, "test": test}


def _read_sop_file(index: Path) -> list[list[str]]:
    items: list[tuple[object, str]] = []
    with _read_index_text(index) as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if lineno == 1 and not fields[0].isdigit():
                continue  # the header line 'image_id class_id super_class_id path'
            if len(fields) != 4 or not all(x.isdigit() for x in fields[:3]):
                raise ValueError(
                    f"{index}, line {lineno}: expected 'image_id class_id super_class_id path' with integer "
                    f"ids, got {line.rstrip()!r}."
                )
            items.append((int(fields[1]), fields[3]))
    return _group_in_order(items)


def load_sop(folder: Path, val_ratio: float) -> SplitDict:
    """Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt`` (one header line, then rows).

    Train-file classes (in order of first appearance) are split by ``val_ratio`` into train and val; test is
    the whole test file.
    """
    train_file, test_file = folder / "Ebay_train.txt", folder / "Ebay_test.txt"
    _require_file(train_file, "sop")
    _require_file(test_file, "sop")
    train, val = _split_ratio(_read_sop_file(train_file), val_ratio)
    return {"train": train, "val": val, "test": _read_sop_file(test_file)}


def load_folder_layout(folder: Path) -> SplitDict:
    """Folder-per-class layout ``<folder>/{train,val,test}/<class>/<image>``.

    Classes are the sorted sub-folder names, images sorted by file name; only files with an extension in
    :data:`IMAGE_EXTENSIONS` (any case) count, and hidden files and folders (a name starting with '.', such as
    ``.ipynb_checkpoints``) are skipped. Missing ``val`` or ``test`` folders give empty parts. A class name in
    both ``train`` and ``val`` is one class in ``BASE-trainval`` (see :func:`get_split`).
    """
    out: SplitDict = {}
    for part in PARTS:
        part_dir = folder / part
        classes: list[list[str]] = []
        if part_dir.is_dir():
            for class_dir in sorted(p for p in part_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                images = sorted(
                    p.name
                    for p in class_dir.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                )
                if not images:
                    raise ValueError(
                        f"Class folder {class_dir} holds no images "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove the folder or add images."
                    )
                classes.append([f"{part}/{class_dir.name}/{name}" for name in images])
        out[part] = classes
    return out


def _join_shared_classes(split: SplitDict, folder: Path, part: str, display: str) -> SplitDict:
    """A folder layout's ``val`` or ``trainval`` part when ``train/`` and ``val/`` share class names: warn that
    such a val split holds no classes out, and for ``trainval`` make each shared name one class (its train
    images, then its val images, at its place among the train classes; the other val classes follow)."""
    names = {"train": [c[0].split("/")[1] for c in split["train"]], "val": [c[0].split("/")[1] for c in split["val"]]}
    train_names = set(names["train"])
    shared = [name for name in names["val"] if name in train_names]
    if not shared:
        return split
    logger.warning(
        "Folder layout %s (%s): %d class name(s) in both train/ and val/ (%s%s) are the same classes: %s-trainval "
        "gives each one label, and the val split holds no classes out (--select-on-val would select on classes "
        "the network trains on). Give val/ other classes than train/ to hold classes out.",
        folder,
        display,
        len(shared),
        ", ".join(shared[:5]),
        ", ..." if len(shared) > 5 else "",
        folder.name,
    )
    if part != "trainval":
        return split
    val_of = dict(zip(names["val"], split["val"], strict=True))
    train = [paths + val_of.get(name, []) for name, paths in zip(names["train"], split["train"], strict=True)]
    rest = [paths for name, paths in zip(names["val"], split["val"], strict=True) if name not in train_names]
    return {"train": train, "val": rest, "test": split["test"]}


def _load_split_file(path: Path) -> SplitDict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Split file {path} is not valid JSON: {exc}.") from exc
    except RecursionError:  # e.g. 100,000 nested brackets: json's parser recurses per level
        raise ValueError(
            f"Split file {path} nests its values too deeply to be a split ({{'train': [[paths], ...], ...}})."
        ) from None
    return _check_split_dict(data, str(path))


def _check_split_dict(data: object, source: str) -> SplitDict:
    """Validate the shape of a split dict; a missing part becomes an empty list."""
    if not isinstance(data, dict):
        raise ValueError(
            f"{source}: a split must be a dict "
            f"{{'train': [[paths of class 1], ...], 'val': [...], 'test': [...]}}, got {type(data).__name__}."
        )
    unknown = sorted(str(k) for k in data if k not in PARTS)
    if unknown:
        logger.warning("%s: ignoring unknown split keys %s (valid: %s).", source, unknown, list(PARTS))
    out: SplitDict = {}
    for part in PARTS:
        classes = data.get(part, [])
        if not isinstance(classes, list | tuple):
            raise ValueError(
                f"{source}: '{part}' must be a list of classes (lists of paths), got {type(classes).__name__}."
            )
        checked: list[list[str]] = []
        for c, paths in enumerate(classes):
            if not isinstance(paths, list | tuple) or not all(isinstance(p, str) for p in paths):
                raise ValueError(
                    f"{source}: '{part}' class {c} must be a list of path strings, got {str(paths)[:80]!r}."
                )
            checked.append(list(paths))
        out[part] = checked
    return out


def _check_path(path: str, root: Path, allow_absolute_paths: bool, where: str) -> None:
    """Refuse an empty path, and (unless ``allow_absolute_paths``) an absolute one or one whose text climbs
    above ``root`` with ``..``. The check is on the text only: symbolic links inside the dataset folder are
    followed wherever they point (a dataset may be assembled from links to images stored elsewhere, and
    resolving every path would stat each of its components), so a link placed in the folder is trusted."""
    if not path:
        raise ValueError(f"{where}: empty image path; every path must name a file relative to {root}.")
    if allow_absolute_paths:
        return
    if os.path.isabs(path) or path.startswith(("/", "\\")):
        raise ValueError(
            f"{where}: absolute path {path!r}; paths must be relative to the dataset folder {root}. "
            "Pass allow_absolute_paths=True if you really mean it."
        )
    normalised = os.path.normpath(path)
    if normalised == ".." or normalised.startswith(".." + os.sep) or normalised.startswith("../"):
        raise ValueError(
            f"{where}: path {path!r} escapes the dataset folder {root} via '..'; keep images inside it "
            "or pass allow_absolute_paths=True."
        )


def _check_duplicates(root: Path, split: SplitDict, source: str) -> None:
    """Refuse an image listed twice anywhere in ``split`` (all parts, not only the selected ones: an image in
    train and in test leaks test data into training), however its path is spelled: paths are compared
    normalised (``c1/./0.jpg``, ``c1//0.jpg`` and ``c1/0.jpg`` are one file; an absolute path, where allowed,
    is compared joined with ``root``). Symbolic links are not followed. Empty paths are left to
    :func:`_check_path`."""
    seen: dict[str, tuple[str, str, int]] = {}
    for p in PARTS:
        for c, class_paths in enumerate(split.get(p, [])):
            for path in class_paths:
                if not path:
                    continue
                key = os.path.normpath(os.path.join(str(root), path))
                if key in seen:
                    first, first_part, first_class = seen[key]
                    spelled = "" if first == path else f" as {first!r}"
                    leak = " (test images would take part in training)" if "test" in (p, first_part) else ""
                    raise ValueError(
                        f"{source}: duplicate image {path!r} in '{p}' class {c}, already listed{spelled} in "
                        f"'{first_part}' class {first_class}{leak}; each image may appear once in a split, in "
                        "one part and one class. Remove one of the two entries."
                    )
                seen[key] = (path, p, c)


def _build_split(name: str, root: Path, split: SplitDict, part: str, allow_absolute_paths: bool, source: str) -> Split:
    parts = ("train", "val") if part == "trainval" else (part,)
    paths: list[str] = []
    labels: list[int] = []
    label = 0
    for p in parts:
        for c, class_paths in enumerate(split[p]):
            where = f"{source}, '{p}' class {c}"
            if not class_paths:
                raise ValueError(f"{where} is empty; every class needs at least one image.")
            for path in class_paths:
                _check_path(path, root, allow_absolute_paths, where)
                paths.append(path)
                labels.append(label)
            label += 1
    _check_duplicates(root, split, source)
    if not paths:
        raise ValueError(
            f"Split {name!r} is empty: {source} defines no classes for part(s) {list(parts)}. "
            "Add them, choose another part, or change val_ratio."
        )
    return Split(name=name, root=root, paths=tuple(paths), labels=tuple(labels))


# --------------------------------------------------------------------------------------------------- lookup


def _parse_name(name: str) -> tuple[str, str]:
    base, sep, suffix = name.rpartition("-")
    if sep and base and suffix in SPLIT_SUFFIXES:
        return base, suffix
    return name, "train"


def _is_own_folder(folder: Path) -> bool:
    return (folder / SPLIT_FILE_NAME).is_file() or (folder / "train").is_dir()


def available_datasets(data_root: str | Path) -> list[str]:
    """Registered dataset names followed by the own dataset folders found under ``data_root`` (sorted)."""
    names = list(DATASETS)
    root = Path(data_root)
    if root.is_dir():
        names += sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in DATASETS and _is_own_folder(p))
    return names


def _unknown(name: str, data_root: Path) -> DatasetNotFoundError:
    valid = available_datasets(data_root)
    return DatasetNotFoundError(
        f"Unknown dataset {name!r}: it is not registered and {data_root / name} is not a dataset folder "
        f"(no {SPLIT_FILE_NAME}, no train/ sub-folder). Valid names: {', '.join(valid)} "
        f"(each optionally with -val, -test or -trainval). {OWN_DATA_HELP}"
    )


def _json_name(name: str) -> tuple[str, str] | None:
    """``'a/b.json:test'`` -> ``('a/b.json', 'test')``, ``'a/b.json'`` -> ``(..., 'train')``, else None."""
    if name.endswith(".json"):
        return name, "train"
    path, sep, part = name.rpartition(":")
    if sep and path.endswith(".json"):
        if part not in SPLIT_SUFFIXES:
            raise ValueError(f"Unknown part {part!r} in split name {name!r}; valid parts: {', '.join(SPLIT_SUFFIXES)}.")
        return path, part
    return None


def get_split(name: str, data_root: str | Path, val_ratio: float = 0.5, allow_absolute_paths: bool = False) -> Split:
    """Resolve a split name to its image paths and labels.

    Args:
        name: ``BASE``, ``BASE-val``, ``BASE-test``, ``BASE-trainval`` (see the module docstring), or a path
            to a split JSON file with an optional ``:part`` suffix.
        data_root: The folder holding the datasets (``<data_root>/cub``, ...).
        val_ratio: Share of the training classes held out as validation classes (registered datasets
            only; split files and folder layouts define val themselves). Must be in [0, 1).
        allow_absolute_paths: Accept absolute paths and ``..`` escapes in split files. Either way, symbolic
            links inside the dataset folder are followed wherever they point.

    Returns:
        The split; its ``root`` is the dataset folder (or the JSON file's folder).

    Raises:
        DatasetNotFoundError: The data root, dataset folder, index or split file is missing, or the name is
            unknown; the message says what was expected (and, for cub/cars/sop, how to download it).
        ValueError: Malformed index or split files, empty classes or splits, duplicate or unsafe paths, or a
            bad ``val_ratio``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Split name must be a non-empty string, got {name!r}.")
    if not isinstance(val_ratio, int | float) or not 0.0 <= val_ratio < 1.0:
        raise ValueError(
            f"val_ratio must be in [0, 1) (share of training classes used for validation), got {val_ratio!r}."
        )
    data_root = Path(data_root).expanduser()

    json_spec = _json_name(name)
    if json_spec is not None:
        json_path, part = Path(json_spec[0]).expanduser(), json_spec[1]
        candidates = [json_path] if json_path.is_absolute() else [json_path, data_root / json_path]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DatasetNotFoundError(
                f"Split file not found: tried {', '.join(str(p) for p in candidates)}. {OWN_DATA_HELP}"
            )
        split = _load_split_file(found)
        return _build_split(name, found.parent, split, part, allow_absolute_paths, str(found))

    base, part = _parse_name(name)
    if base not in DATASETS and not _is_own_folder(data_root / base) and _is_own_folder(data_root / name):
        base, part = name, "train"  # an own folder whose name happens to end in a part suffix
    display = base if part == "train" else f"{base}-{part}"

    if base in DATASETS:
        if not data_root.is_dir():
            raise _not_found("Data root", data_root, base)
        folder = data_root / base
        if not folder.is_dir():
            raise _not_found(f"Folder of dataset {base!r}", folder, base)
        split = _check_split_dict(DATASETS[base](folder, float(val_ratio)), f"loader of {base!r}")
        logger.debug("Loaded dataset %r from %s with val_ratio=%s", base, folder, val_ratio)
        return _build_split(display, folder, split, part, allow_absolute_paths, f"dataset {base!r} ({folder})")

    if not data_root.is_dir():
        raise DatasetNotFoundError(
            f"Data root not found: {data_root} (needed for dataset {base!r}). Pass the folder holding your "
            f"datasets as data_root / --data-root. {OWN_DATA_HELP}"
        )
    folder = data_root / base
    if (folder / SPLIT_FILE_NAME).is_file():
        split = _load_split_file(folder / SPLIT_FILE_NAME)
        source = str(folder / SPLIT_FILE_NAME)
    elif (folder / "train").is_dir():
        split = load_folder_layout(folder)
        source = f"folder layout {folder}"
        if part in ("val", "trainval"):
            split = _join_shared_classes(split, folder, part, display)
    else:
        raise _unknown(base, data_root)
    return _build_split(display, folder, split, part, allow_absolute_paths, source)


def split_from_lists(
    name: str, root: str | Path, classes: Sequence[Sequence[str]], allow_absolute_paths: bool = False
) -> Split:
    """Build a :class:`Split` directly from a list of classes (lists of paths relative to ``root``)."""
    split = _check_split_dict({"train": [list(c) for c in classes]}, f"split {name!r}")
    return _build_split(name, Path(root), split, "train", allow_absolute_paths, f"split {name!r}")


register_dataset("cub", load_cub)
register_dataset("cars", load_cars)
register_dataset("sop", load_sop)


def load_synth(folder: Path, val_ratio: float) -> SplitDict:
    """The built-in synthetic dataset (``raml data synth``), stored in the CUB-200-2011 format."""
    if not (folder / "images.txt").is_file():
        raise DatasetNotFoundError(
            f"Synthetic dataset not found: {folder / 'images.txt'} is missing. Generate it with "
            f"'raml data synth --out {folder}' (or run 'raml demo', which does it for you)."
        )
    return load_cub(folder, val_ratio)


EXPECTED_LAYOUTS["synth"] = (
    "the CUB-200-2011 layout written by 'raml data synth --out <data-root>/synth' (or by 'raml demo')"
)
register_dataset("synth", load_synth)
