"""Restricted unpickling for old training checkpoints that ``torch.load(weights_only=True)`` refuses.

Checkpoints written by the reference implementation (PyTorch 1.12) can hold objects that the weights-only
unpickler does not rebuild, although their weights are plain tensors: a ``numpy.float64`` ``max_map``, or a
``OneCycleLR`` state dict whose ``anneal_func`` is a bound method (pickled as ``getattr(<scheduler>, name)``
together with the whole scheduler and optimizer objects). ``restricted_torch_load`` reads such a file with an
unpickler that

- rebuilds tensors, parameters, storages, plain containers, ``OrderedDict``, ``torch.Size``/dtypes/devices and
  numpy scalars/arrays (all of which construct data, never run code); torch's rebuild functions are handed to
  the pickle as stand-ins that call them, so that a pickle cannot change them for later loads (a BUILD on one,
  which would set e.g. its ``__defaults__``, is refused with ``UnsafeStateError``);
- replaces objects of the training machinery (``torch.optim.*`` optimizers and schedulers, ``getattr`` of
  bound methods, ``copyreg`` reconstructors, ``functools.partial``, ``weakref``) by inert ``Dropped``
  placeholders that ignore their arguments and state;
- refuses every other global (``os.system``, ``subprocess.Popen``, ``builtins.eval``, ...) with
  ``UnsafeGlobalError``: a crafted file is never executed, not even partly.

Nothing outside the allow-list above is ever imported or called, so the placeholders cannot run code either;
the refusal list exists so that a file that tries to run code is reported as such instead of loading.

TorchScript archives are refused (``TorchScriptArchiveError``) before ``torch.load`` sees them: given one,
``torch.load(weights_only=False)`` would hand it to ``torch.jit.load``, which runs its code and never consults
the pickle module above. The file is read once, and the bytes checked are the bytes loaded: a file replaced
between the check and the load cannot get through.

A file can also ask for far more memory than it holds, and the loaders (``torch.load``'s weights-only unpickler
as well as the one above) would allocate it before anything refuses the file: a pickle that calls
``bytearray(10**10)``, ``_codecs.encode`` chained through ``hex_codec`` (each call doubles), a numpy array or a
tensor storage declared larger than the file (its elements times their size: numpy arrays and scalars only of plain
number, fixed-width string (``U<n>``, ``S<n>``) and datetime dtypes, as a void, structured or object dtype can be
megabytes an element; in torch's legacy format, all its
storages together must fit in the bytes after its pickles and be in its list of storage keys, or torch leaves them
uninitialised), a zip record stored compressed (``torch.save`` never compresses;
a 1 MB record can inflate to 1 GB). ``check_declared_sizes`` refuses such files (``DeclaredSizeError``) by
reading only the zip's directory and the pickles, with an unpickler that builds nothing but checks every size
passed to a constructor against the file's own size.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import codecs
import importlib
import io
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "DeclaredSizeError",
    "Dropped",
    "TorchScriptArchiveError",
    "check_declared_sizes",
    "UnsafeGlobalError",
    "UnsafeStateError",
    "contains_dropped",
    "is_torchscript_archive",
    "restricted_torch_load",
]


class UnsafeGlobalError(pickle.UnpicklingError):
    """The pickle references a global outside both the allow-list and the inert training-state list."""

    def __init__(self, global_name: str) -> None:
        super().__init__(f"the pickle references {global_name}, which is neither data nor training state")
        self.global_name = global_name


class UnsafeStateError(UnsafeGlobalError):
    """The pickle sets the state or attributes of a global it references (BUILD on a function), which would change
    it for every later load in the process."""

    def __init__(self, global_name: str) -> None:
        pickle.UnpicklingError.__init__(
            self, f"the pickle sets the state of {global_name}, a function of torch, not of an object it built"
        )
        self.global_name = global_name


class _Rebuilder:
    """What the restricted unpickler hands out for one of torch's rebuild functions: calls it, but cannot be changed.

    The functions themselves are plain Python functions: a pickle's BUILD on the global would set their attributes
    (``__defaults__``, ``__kwdefaults__``, ...) for the whole process, so that every later load, however clean,
    rebuilt tensors as the file chose. BUILD on this stand-in refuses the file instead; it has no other attributes
    to set."""

    __slots__ = ("_function", "_name")

    def __init__(self, function: Any, name: str) -> None:
        object.__setattr__(self, "_function", function)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise UnsafeStateError(self._name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafeStateError(self._name)

    def __repr__(self) -> str:
        return f"<rebuilder {self._name}>"


class TorchScriptArchiveError(pickle.UnpicklingError):
    """The file is a TorchScript archive (``torch.jit.save``), which ``torch.load`` would run as code."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"the file is a TorchScript archive ({detail}), not a torch.save checkpoint")
        self.detail = detail


class DeclaredSizeError(pickle.UnpicklingError):
    """The file asks the loader for more memory than it holds (see ``check_declared_sizes``)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"refused before loading: {detail}")
        self.detail = detail


_ZIP_MAGIC = b"PK\x03\x04"  # what torch.load checks to read a file as a zip archive
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_SIZE, _ZIP64_END_SIZE = 20, 56


def _check_same_directory(file: IO[bytes], archive: zipfile.ZipFile) -> None:
    """Refuse an archive whose central directory torch's zip reader (miniz) may find elsewhere than Python's.

    Python's reader takes a directory that is not at the offset its end record names for an archive appended to
    other data, and reads it where it lies; miniz reads it at the offset named, so the two can read two different
    directories (a harmless one checked here, a hostile one loaded by torch). Likewise Python reads a zip64 end
    record just before its locator, miniz where the locator points. ``torch.save`` writes neither layout.

    Raises:
        zipfile.BadZipFile: If the two readers may disagree.
    """
    end = zipfile._EndRecData(file)  # the end record ZipFile read (zip64 values where it found them)
    if end is None:
        raise zipfile.BadZipFile("a zip archive without an end record")
    location = end[zipfile._ECD_LOCATION]
    locator = b""
    if location >= _ZIP64_LOCATOR_SIZE:
        file.seek(location - _ZIP64_LOCATOR_SIZE)
        locator = file.read(_ZIP64_LOCATOR_SIZE)
    zip64 = end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64
    if locator.startswith(_ZIP64_LOCATOR) != zip64 or (
        zip64 and int.from_bytes(locator[8:16], "little") != location - _ZIP64_LOCATOR_SIZE - _ZIP64_END_SIZE
    ):
        raise zipfile.BadZipFile("a zip archive whose zip64 end records disagree (its readers would differ)")
    if archive.start_dir != end[zipfile._ECD_OFFSET]:
        raise zipfile.BadZipFile(
            f"a zip archive whose central directory lies at {archive.start_dir}, not at {end[zipfile._ECD_OFFSET]} "
            "where its end record puts it (data before the archive?), so that its readers would differ"
        )


def is_torchscript_archive(file: IO[bytes]) -> str | None:
    """Why the seekable binary ``file`` is (or may be) a TorchScript archive, or None if it is not one.

    Reads only the zip's directory (at its end), not its members; the position is restored.

    Raises:
        zipfile.BadZipFile: If the file starts like a zip archive (as torch.load checks) but its directory
            cannot be read (e.g. a truncated file): it is then not known what torch's own reader would find.
    """
    start = file.tell()
    try:
        if file.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return None
        file.seek(start)
        try:
            with zipfile.ZipFile(file) as archive:
                _check_same_directory(file, archive)
                names = archive.namelist()
        except (zipfile.LargeZipFile, ValueError, EOFError) as error:
            raise zipfile.BadZipFile(f"a zip archive whose directory is unreadable: {error}") from error
    finally:
        file.seek(start)
    for name in names:
        inner = name.split("/", 1)[-1]  # torch's records are named after the archive's top folder
        if inner == "constants.pkl" or inner.startswith(("code/", ".data/ts_code/")):
            return f"it holds {name}"
    return None


class Dropped:
    """Inert stand-in for an object of the training machinery: ignores its arguments, state and items."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Dropped:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def add(self, item: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<dropped {self.global_name}>"


_TORCH_REBUILDERS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
)
_BUILTINS = (
    "set",
    "frozenset",
    "dict",
    "list",
    "tuple",
    "int",
    "float",
    "bool",
    "str",
    "bytes",
    "complex",
    "bytearray",
    "slice",
)
_NUMPY = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
}
_DROPPABLE_GLOBALS = {
    ("builtins", "getattr"),
    ("builtins", "object"),
    ("copyreg", "_reconstructor"),
    ("copyreg", "__newobj__"),
    ("copyreg", "__newobj_ex__"),
    ("functools", "partial"),
    ("collections", "defaultdict"),
}
_DROPPABLE_MODULES = ("torch.optim", "weakref", "_weakref")


def _allowed(module: str, name: str) -> Any | None:
    """The real object for an allowed data global (for torch's rebuild functions, which a pickle could change, a
    stand-in that calls them), else None. Every other object returned is a builtin or a class of C whose attributes
    cannot be set."""
    if module == "torch._utils" and name in _TORCH_REBUILDERS:
        return _Rebuilder(getattr(torch._utils, name), f"{module}.{name}")
    if module == "torch":
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) or name in ("Size", "device"):
            return value
        return None
    if module == "collections" and name == "OrderedDict":
        return OrderedDict
    if module == "builtins" and name in _BUILTINS:
        return getattr(builtins, name)
    if module == "_codecs" and name == "encode":
        return codecs.encode
    if (module, name) in _NUMPY:
        import numpy

        # numpy 2 moved numpy.core to numpy._core; pickles of numpy 1 name the old module.
        if module.startswith("numpy.core") and hasattr(numpy, "_core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return getattr(importlib.import_module(module), name)
    return None


def _droppable(module: str, name: str) -> bool:
    return (module, name) in _DROPPABLE_GLOBALS or any(
        module == prefix or module.startswith(prefix + ".") for prefix in _DROPPABLE_MODULES
    )


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol 0-2 pickles name Python 2 modules (``__builtin__``); map them as pickle itself does (those names
    do not exist in Python 3, so mapping them whatever the protocol is harmless)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _restricted_pickle_module(dropped: set[str]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose ``Unpickler`` only rebuilds allowed globals."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module, name = _python3_name(module, name)
            obj = _allowed(module, name)
            if obj is not None:
                return obj
            global_name = f"{module}.{name}"
            if _droppable(module, name):
                dropped.add(global_name)
                return type(f"Dropped[{global_name}]", (Dropped,), {"global_name": global_name})
            raise UnsafeGlobalError(global_name)

    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    module = types.ModuleType("raml_restricted_pickle")
    module.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


def restricted_torch_load(source: str | Path | IO[bytes]) -> tuple[Any, list[str]]:
    """Load a ``torch.save`` file onto the CPU with the restricted unpickler.

    The file is read into memory once (its size more, until the load returns) and loaded from those bytes
    after checking that they are not a TorchScript archive; see the module docstring.

    Args:
        source: The file, or a binary file object open on it (read from its current position).

    Returns:
        The loaded object (training-state objects replaced by ``Dropped`` placeholders) and the sorted names
        of the globals that were replaced.

    Raises:
        TorchScriptArchiveError: If the file is a TorchScript archive (it is then not loaded at all).
        zipfile.BadZipFile: If it starts like a zip archive whose directory is unreadable (not loaded either).
        DeclaredSizeError: If it asks for more memory than it holds (``check_declared_sizes``; not loaded).
        UnsafeGlobalError: If the file references any other global (it is then not loaded at all).
        Exception: Whatever ``torch.load`` raises for a corrupt file.
    """
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
    buffer = io.BytesIO(data)
    reason = is_torchscript_archive(buffer)
    if reason is not None:
        raise TorchScriptArchiveError(reason)
    check_declared_sizes(buffer)
    dropped: set[str] = set()
    # weights_only=False only lets torch use the given pickle module: the restricted one above.
    obj = torch.load(buffer, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module(dropped))
    return obj, sorted(dropped)


# torch's legacy (non-zip) format: this pickled number, then the protocol version, the system info, the object
# (its storages as persistent ids) and the storage keys, each a pickle of its own; the storages' bytes follow.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PICKLES = 5
# numpy's names of its plain number types, as it pickles a dtype ('f4', 'i8', 'b1', 'c16'; a byte order is in its
# state) or as ndarray's pickle names the empty array _reconstruct builds (b'b'): the bytes of an element
_NUMBER_DTYPE = re.compile(r"[<>|=]?[biufc]([0-9]{1,2})")
# numpy's fixed-width text types, pickled as 'U<n>' (n characters of 4 bytes) and 'S<n>' (n bytes), and its
# datetime and timedelta types, pickled as 'M8' / 'm8' (8 bytes; the unit is in the state's metadata)
_TEXT_DTYPE = re.compile(r"[<>|=]?([US])([0-9]{1,12})")
_TIME_DTYPE = re.compile(r"[<>|=]?[Mm]8(\[[0-9]*[A-Za-z]+\])?")
_NUMBER_CODES = {"?": 1, "b": 1, "B": 1, "h": 2, "H": 2, "i": 4, "I": 4, "l": 8, "L": 8, "q": 8, "Q": 8, "e": 2}
_NUMBER_CODES.update({"f": 4, "d": 8, "g": 16, "F": 8, "D": 16, "G": 32})


def _number_itemsize(name: Any) -> int | None:
    """The bytes of an element of the numpy dtype ``name`` (str or bytes) if it names a plain number type, a
    fixed-width string (``U<n>``, ``S<n>``) or a datetime / timedelta (``M8``, ``m8``), else None (void,
    structured, subarray, object: any size per element, or not known here)."""
    if isinstance(name, bytes):
        name = name.decode("latin1")
    if not isinstance(name, str):
        return None
    if name in _NUMBER_CODES:
        return _NUMBER_CODES[name]
    if _TIME_DTYPE.fullmatch(name):
        return 8
    text = _TEXT_DTYPE.fullmatch(name)
    if text:
        return int(text.group(2)) * (4 if text.group(1) == "U" else 1)
    match = _NUMBER_DTYPE.fullmatch(name)
    return int(match.group(1)) if match and 0 < int(match.group(1)) <= 32 else None


def _sized_by_state(name: Any) -> bool:
    """Whether numpy takes the element size of the dtype ``name`` from its pickled state (a fixed-width string:
    the state's elsize must then equal the name's), rather than from the name (its state's elsize is -1)."""
    if isinstance(name, bytes):
        name = name.decode("latin1")
    return isinstance(name, str) and _TEXT_DTYPE.fullmatch(name) is not None


_VALUED_BUILTINS = ("int", "float", "complex", "bool", "slice")  # results that are single values, never iterated
_TEXT_ENCODINGS = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1", "utf-8", "utf8", "utf_8", "ascii"}


class _Inert(Dropped):
    """What the size check's unpickler builds for every global: accepts any call, item or state, holds nothing.

    ``elements`` is how many items the real object may yield when iterated (a numpy array's or a storage's
    elements, a list built from stored data; None: not known, as for a tensor whose shape is not plain ints), and
    ``item_bytes`` what each costs when a constructor such as ``list()`` builds an object per item (a numpy scalar,
    a float: about 33 bytes and a pointer; see ``_size_checking_unpickler``)."""

    elements: int | None = 0
    item_bytes = 64

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()


def _plain_data(value: Any) -> bool:
    """Whether the size check's unpickler built ``value`` from opcodes alone (as a plain value or container, which
    every unpickler builds alike), not by a call (a stand-in, a function, a class)."""
    return type(value) in (type(None), bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set)


def _element_count(shape: Any, limit: int, what: str) -> int:
    """The number of elements of a numpy shape (an int or a sequence of ints), refused above ``limit``."""
    dims = (shape,) if type(shape) is int else shape
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int and d >= 0 for d in dims):
        raise DeclaredSizeError(f"{what} has the shape {shape!r}, not a tuple of sizes")
    count = 1
    for dim in dims:
        count *= dim
        if count > limit:
            raise DeclaredSizeError(f"{what} declares {shape!r} elements in a file of {limit} bytes")
    return count


class _StorageType(_Inert):
    """What the size check's unpickler builds for a storage type (``torch.FloatStorage``): its element's size."""

    element_size = 16  # the largest (complex128), for a type torch does not know (it then refuses the file)


def _storage_type(name: str) -> type[_StorageType]:
    """The stand-in for the storage type ``name`` (torch's loaders map every global whose name holds "Storage" to
    a dtype by its name, whatever its module)."""
    if name == "UntypedStorage":
        return type("UntypedStorage", (_StorageType,), {"element_size": 1})
    try:
        size = torch._utils._element_size(torch.storage._get_dtype_from_pickle_storage_type(name))
    except (KeyError, RuntimeError, TypeError):
        return _StorageType
    return type(name, (_StorageType,), {"element_size": size})


def _size_checking_unpickler(file: IO[bytes], limit: int, storages: dict[Any, int] | None = None) -> pickle.Unpickler:
    """An unpickler that imports and calls nothing: every global becomes an ``_Inert`` stand-in, except the
    constructors that take a size (``bytes``, ``bytearray``, ``_codecs.encode``, numpy arrays, dtypes and scalars),
    which refuse any size the file (``limit`` bytes) cannot hold, as do the storages named by torch's persistent ids
    (their elements times their element's size). ``storages``, if given, receives the bytes of each storage, by
    its key."""

    # what the real load copies, in all: the bytes objects it builds and the numpy arrays' data. A string stored
    # once can be passed to bytearray() any number of times (9 pickle bytes a call), so each object being within
    # the file's size is not enough: the total is bounded too (twice the file: a numpy array's data is built as
    # bytes, then copied into the array; 1 MiB of slack for small files)
    budget = 2 * limit + (1 << 20)
    built = [0]

    def spend(size: int, what: str) -> None:
        built[0] += size
        if built[0] > budget:
            raise DeclaredSizeError(
                f"the pickle builds {built[0]} or more bytes ({what}) from a file of {limit} bytes: the same data "
                "copied over and over"
            )

    def sized_bytes(kind: type) -> Any:
        """builtins.bytes / bytearray: built from data (str, bytes, a list of ints: no larger than the pickle), as
        the real load builds them (``bytes()`` is how protocol 2 writes ``b""``, e.g. an empty numpy array's data),
        never from a size."""

        def build(*args: Any, **kwargs: Any) -> Any:
            for value in (*args[:1], *kwargs.values()):
                if not isinstance(value, (str, bytes, bytearray, list, tuple)):
                    raise DeclaredSizeError(
                        f"the pickle calls bytes/bytearray with {type(value).__name__} {value!r}"[:200]
                    )
            try:
                made = kind(*args, **kwargs)
            except (TypeError, ValueError, LookupError):  # e.g. a list holding stand-ins: the real load decides
                return _Inert()
            spend(len(made), "bytes/bytearray")
            return made

        return build

    def encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        # pickle writes bytes for protocols < 3 as _codecs.encode(<str>, "latin1"); other codecs can grow the data
        if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower() not in _TEXT_ENCODINGS:
            raise DeclaredSizeError(f"the pickle calls _codecs.encode with the codec {encoding!r}")
        made = codecs.encode(obj, encoding, "replace")
        spend(len(made), "_codecs.encode")
        return made

    def itemsize(dtype: Any, what: str) -> int:
        """The bytes of each element of ``what`` of the numpy dtype ``dtype`` (a ``Dtype`` stand-in, or the name
        ``_reconstruct`` is given), refused unless it is a plain number, fixed-width string or datetime type: a
        composite, void or object dtype can be any size per element (``V1000000``: a megabyte), and numpy
        pickles none in a checkpoint. A string type's elements must each fit in the file."""
        if isinstance(dtype, Dtype):
            dtype.used = True
        size = dtype.itemsize if isinstance(dtype, Dtype) else _number_itemsize(dtype)
        if size is None:
            raise DeclaredSizeError(
                f"the pickle holds {what} whose dtype is not a plain number, string or datetime type (a "
                "composite, void or object dtype, whose elements can be any size)"
            )
        if size > limit:
            raise DeclaredSizeError(f"the pickle holds {what} of {size} bytes in a file of {limit} bytes")
        return size

    def array_bytes(shape: Any, dtype: Any) -> tuple[int, int]:
        """The elements and bytes of a numpy array of ``shape`` and ``dtype``, refused above the file's size."""
        count = _element_count(shape, limit, "a numpy array")
        size = itemsize(dtype, "a numpy array")
        if count * size > limit:
            raise DeclaredSizeError(
                f"a numpy array declares {shape!r} elements of {size} bytes in a file of {limit} bytes"
            )
        return count, count * size

    class SizedArray(_Inert):  # numpy.ndarray(shape, dtype=float, ...), and what _reconstruct returns
        def __new__(cls, *args: Any, **kwargs: Any) -> SizedArray:
            made = super().__new__(cls)
            if args or kwargs:  # called by the pickle: numpy allocates the array
                shape = args[0] if args else kwargs.get("shape")
                dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
                made.elements, size = array_bytes(shape, "f8" if dtype is None else dtype)
                spend(size, "numpy arrays")
            return made

        def __setstate__(self, state: Any) -> None:
            # ndarray.__reduce__'s state: (version, shape, dtype, is_fortran, data); numpy trusts shape too much
            # (an object array whose list is short crashes it): only raw bytes at least as long as the shape
            if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[4], bytes):
                raise DeclaredSizeError("the pickle holds a numpy array that is not plain bytes (an object array?)")
            count = _element_count(state[1], limit, "a numpy array")
            size = itemsize(state[2], "a numpy array")
            if count * size > len(state[4]):
                raise DeclaredSizeError(
                    f"a numpy array declares {state[1]!r} elements of {size} bytes for {len(state[4])} bytes"
                )
            spend(len(state[4]), "numpy arrays' data")  # the real load copies it into the array
            self.elements = count

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> SizedArray:
        # numpy allocates the array (numpy pickles it empty, then sets its state)
        made = SizedArray()
        made.elements, size = array_bytes(shape, dtype)
        spend(size, "numpy arrays")
        return made

    def items(values: tuple[Any, ...]) -> int | None:
        """How many items a constructor given ``values`` may hold (None: not known)."""
        total = 0
        for value in values:
            if isinstance(value, (str, bytes, bytearray, list, tuple, set, frozenset, dict)):
                total += len(value)
            elif isinstance(value, _Inert):
                if value.elements is None:
                    return None
                total += value.elements
        return total

    def copied(values: tuple[Any, ...], per_item: bool = True) -> int:
        """What a constructor given ``values`` may copy out of them: their characters or bytes, a pointer (8
        bytes) per item of a container (e.g. ``list(s)`` of a stored string: a list of its characters), and, unless
        ``per_item`` is false (torch's rebuild functions, which wrap an array or tensor whole), an object per
        element of a stand-in (``list(a)`` of a stored numpy array, tensor or storage: a numpy scalar, tensor or
        float per element)."""
        size = 0
        for value in values:
            if isinstance(value, (str, bytes, bytearray)):
                size += len(value)
            elif isinstance(value, (list, tuple, set, frozenset, dict)):
                size += 8 * len(value)
            elif per_item and isinstance(value, _Inert):
                if value.elements is None:
                    raise DeclaredSizeError(
                        "the pickle passes a tensor whose shape is not plain sizes to a constructor that may iterate it"
                    )
                size += value.elements * value.item_bytes
        return size

    class Counted(_Inert):
        """Every other global (list, set, str, OrderedDict, ...): a stand-in, but what the real load would copy
        from its arguments counts against the budget (the same stored object passed to list() over and over is as
        large as the same string passed to bytearray()); the stand-in holds as many items as its arguments."""

        def __new__(cls, *args: Any, **kwargs: Any) -> Counted:
            values = (*args, *kwargs.values())
            spend(copied(values), "objects built from stored data")
            made = super().__new__(cls)
            made.elements = items(values)
            return made

        def __call__(self, *args: Any, **kwargs: Any) -> Counted:
            return Counted(*args, **kwargs)

    class Valued(Counted):
        """A global whose result is a single value, not a collection (``int``, ``float``, a numpy dtype or scalar,
        ``torch.device``): charged as ``Counted`` for what it copies, but it yields no items. ``dtype('f4')`` is
        built from a string and ``scalar(<dtype>, b'...')`` from a dtype and bytes; counting their arguments' items
        charged every numpy scalar of a loss history an object per character of its dtype's name."""

        def __new__(cls, *args: Any, **kwargs: Any) -> Valued:
            made = super().__new__(cls, *args, **kwargs)
            made.elements = 0
            return made

    class Dtype(Valued):
        """numpy.dtype(name, align, copy): the bytes of its elements where it is a plain number type, else None.
        numpy pickles such a dtype as its name ('f4', 'i8', 'b1', 'c16') and a state without subarray, field names
        or fields; any other state makes it a composite type of any size."""

        itemsize: int | None = None
        used = False  # by an array or scalar, checked with this itemsize
        sized_by_state = False  # a fixed-width string: numpy sets its element size from the state's elsize

        def __new__(cls, *args: Any, **kwargs: Any) -> Dtype:
            made = super().__new__(cls, *args, **kwargs)
            made.itemsize = _number_itemsize(args[0]) if args and not kwargs else None
            made.sized_by_state = bool(args) and _sized_by_state(args[0])
            return made

        def __setstate__(self, state: Any) -> None:
            # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata]); numpy pickles
            # -1 as the elsize of a number or datetime type (sized by its name), and a string type's own size
            sizes = (self.itemsize,) if self.sized_by_state else (-1, self.itemsize)
            if not (isinstance(state, tuple) and len(state) >= 8 and state[2:5] == (None, None, None)) or not any(
                type(state[5]) is int and state[5] == size for size in sizes
            ):
                if self.used:  # numpy would change the arrays built with it
                    raise DeclaredSizeError("the pickle makes a numpy dtype composite after arrays were built of it")
                self.itemsize = None

    class Scalar(Valued):
        """numpy's scalar(dtype, data): numpy allocates an element of the dtype (zeroed without data)."""

        def __new__(cls, *args: Any, **kwargs: Any) -> Scalar:
            spend(itemsize(args[0] if args else kwargs.get("descr"), "a numpy scalar"), "numpy scalars")
            return super().__new__(cls, *args, **kwargs)

    class Rebuilt(_Inert):
        """What torch's rebuild functions return: a tensor (or parameter) of the elements its shape declares,
        each an object of about 650 bytes when a constructor iterates it (``list(t)``: a 0-d tensor per element)."""

        item_bytes = 1024

    def tensor_elements(shape: Any) -> int | None:
        if not isinstance(shape, (tuple, list)) or not all(type(d) is int and d >= 0 for d in shape):
            return None
        count = 1
        for dim in shape:
            count = min(count * dim, 1 << 62)
        return count

    def rebuild(name: str) -> Any:
        """torch._utils.<name>: nothing built or copied (a view of a storage, a parameter around a tensor)."""

        def build(*args: Any, **kwargs: Any) -> Rebuilt:
            values = (*args, *kwargs.values())
            spend(copied(values, per_item=False), "objects built from stored data")
            made = Rebuilt()
            if name.startswith("_rebuild_tensor"):  # (storage, storage_offset, size, stride, ...)
                made.elements = tensor_elements(args[2] if len(args) > 2 else kwargs.get("size"))
            elif name.startswith("_rebuild_parameter") and args and isinstance(args[0], _Inert):  # (data, ...)
                made.elements = args[0].elements
            else:
                made.elements = None
            return made

        return build

    checked: dict[tuple[str, str], Any] = {
        ("builtins", "bytes"): sized_bytes(bytes),
        ("builtins", "bytearray"): sized_bytes(bytearray),
        ("_codecs", "encode"): encode,
        ("numpy", "ndarray"): SizedArray,
    }
    for numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        checked[(numpy_core, "_reconstruct")] = reconstruct
        checked[(numpy_core, "scalar")] = Scalar
    checked[("numpy", "dtype")] = Dtype
    for valued in (("torch", "device"), *(("builtins", n) for n in _VALUED_BUILTINS)):
        checked[valued] = Valued

    class SizeCheckingUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module, name = _python3_name(module, name)
            if "Storage" in name:
                return _storage_type(name)
            if (module == "torch._utils" and name.startswith("_rebuild_")) or (module, name) == (
                "torch._tensor",
                "_rebuild_from_type_v2",
            ):
                return rebuild(name)
            return checked.get((module, name), Counted)

        def persistent_load(self, saved_id: Any) -> Any:
            # torch's storages: ("storage", type, key, location, numel[, view]); the file holds all their bytes
            if isinstance(saved_id, tuple) and len(saved_id) >= 5 and saved_id[0] in ("storage", b"storage"):
                kind, key, numel = saved_id[1], saved_id[2], saved_id[4]
                element_size = kind.element_size if isinstance(kind, type) and issubclass(kind, _StorageType) else 16
                if type(numel) is not int or not 0 <= numel * element_size <= limit:
                    raise DeclaredSizeError(
                        f"it declares a tensor storage of {numel!r} elements of {element_size} bytes in a file of "
                        f"{limit} bytes"
                    )
                if type(key) not in (str, int, bytes):
                    raise DeclaredSizeError(f"it names a tensor storage {type(key).__name__} {key!r}"[:200])
                if storages is not None:  # a key read again is the storage read first (torch allocates it once)
                    storages[key] = max(storages.get(key, 0), numel * element_size)
                storage = _Inert()
                storage.elements = numel  # list(storage): a Python number per element
                return storage
            return _Inert()

    return SizeCheckingUnpickler(file, encoding="latin1")


def torch_load_mapped(handle: IO[bytes]) -> Any:
    """``torch.load(weights_only=True, mmap=True)`` of the very file ``handle`` has open (checked by the caller with
    :func:`check_declared_sizes`), so that a file swapped in at its path after the check is never loaded: through
    ``/proc/self/fd`` where it exists (Linux); elsewhere through the path, once its identity (device, inode, size,
    modification time) is the handle's.

    Raises:
        DeclaredSizeError: If the path no longer names the file checked.
        Exception: Whatever ``torch.load`` raises.
    """
    import os

    by_descriptor = f"/proc/self/fd/{handle.fileno()}"
    if os.path.exists(by_descriptor):
        return torch.load(by_descriptor, map_location="cpu", weights_only=True, mmap=True)
    checked, now = os.fstat(handle.fileno()), os.stat(handle.name)
    if (checked.st_dev, checked.st_ino, checked.st_size, checked.st_mtime_ns) != (
        now.st_dev,
        now.st_ino,
        now.st_size,
        now.st_mtime_ns,
    ):
        raise DeclaredSizeError(f"{handle.name} was replaced after its size check")
    return torch.load(handle.name, map_location="cpu", weights_only=True, mmap=True)


def _check_legacy_storages(storages: dict[Any, int], keys: Any, after: int) -> None:
    """Refuse a legacy file whose storages (``storages``: bytes by key, as the object's pickle declares them) are
    not all in its list of storage keys (``keys``, its last pickle: the storages whose data follows, each an 8-byte
    size and its bytes; torch allocates every declared storage and reads data only for the listed ones, so an
    unlisted one is memory of the process, uninitialised) or need more than the ``after`` bytes that follow."""
    if not isinstance(keys, list) or not all(type(key) in (str, int, bytes) for key in keys):
        raise DeclaredSizeError("its list of storage keys (the last of torch's legacy pickles) is not a list of keys")
    listed = set(keys)
    missing = [key for key in storages if key not in listed]
    if missing:
        raise DeclaredSizeError(
            f"it declares {len(missing)} tensor storage(s) whose data it does not hold (not in its list of storage "
            f"keys, e.g. {missing[0]!r}): torch would leave them uninitialised"
        )
    needed = sum(storages.values()) + 8 * len(keys)
    if needed > after:
        raise DeclaredSizeError(
            f"its tensor storages declare {needed} bytes of data, but only {after} bytes follow its pickles"
        )


def check_declared_sizes(file: IO[bytes]) -> None:
    """Refuse a ``torch.save`` file that makes the loader allocate more memory than the file holds.

    Reads the seekable binary ``file`` from its current position, which is restored: for a zip archive its
    directory (every record must be stored uncompressed, as ``torch.save`` writes them, their sizes must add
    up to no more than the file, and no two names may differ only in case) and its ``data.pkl`` records, whatever
    the case of their names (torch's zip reader ignores it); for torch's legacy format its pickles (the first of
    which must be torch's magic number as a plain int: a non-zip file whose first pickle is built by a call is
    refused, as it may build the number in torch's unpickler). The pickles
    are read by an unpickler that imports and runs nothing and checks every size given to a constructor (see
    ``_size_checking_unpickler``), and the total of the bytes and array data it builds. A file that passes loads
    within about three times its own size (its storages, and its bytes and arrays at most twice the file), plus
    the small objects its pickle builds.

    Raises:
        DeclaredSizeError: If the file asks for more than it holds (it must then not be loaded).
        zipfile.BadZipFile: If it starts like a zip archive whose directory cannot be read.
        Exception: Whatever unpickling raises for a pickle that cannot be read at all (torch.load would fail too).
    """
    start = file.tell()
    try:
        limit = file.seek(0, io.SEEK_END) - start
        file.seek(start)
        if file.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            file.seek(start)
            storages: dict[Any, int] = {}
            for index in range(_LEGACY_PICKLES):
                value = _size_checking_unpickler(file, limit, storages).load()
                if index == 0 and not (type(value) is int and value == _LEGACY_MAGIC_NUMBER):
                    if _plain_data(value) and value != _LEGACY_MAGIC_NUMBER:
                        return  # not torch's legacy format: torch.load refuses it before reading anything more
                    # torch.load reads every non-zip file as its legacy format, and refuses it only if the number
                    # its own unpickler builds differs; that unpickler may build it from a call this one does not
                    # make (``int("1950a86a...", 16)``), so a first pickle built by a call is refused here
                    raise DeclaredSizeError(
                        "it is neither a zip archive nor torch's legacy format (its first pickle is not torch's magic "
                        "number written as a plain int, but built by a call)"
                    )
            _check_legacy_storages(storages, value, start + limit - file.tell())
            return
        file.seek(start)
        try:
            with zipfile.ZipFile(file) as archive:
                _check_same_directory(file, archive)
                records = archive.infolist()
                # torch's zip reader (miniz) finds a record whatever the case of its name: every record whose
                # name could be the one torch reads is checked, and names that differ only in case are refused
                # (which of them torch would read is not known)
                seen: dict[str, str] = {}
                for record in records:
                    folded = record.filename.lower()
                    if folded in seen:
                        raise DeclaredSizeError(
                            f"its records {seen[folded]!r} and {record.filename!r} have the same name (ignoring "
                            "case, as torch's zip reader does); torch.save writes every name once"
                        )
                    seen[folded] = record.filename
                    if record.compress_type != zipfile.ZIP_STORED:
                        raise DeclaredSizeError(
                            f"its record {record.filename} is compressed (method {record.compress_type}); torch.save "
                            "stores records uncompressed, and a compressed one can inflate far beyond the file"
                        )
                declared = sum(record.file_size for record in records)
                if declared > limit:
                    raise DeclaredSizeError(f"its records declare {declared} bytes in a file of {limit} bytes")
                pickles = [archive.read(r) for r in records if r.filename.rsplit("/", 1)[-1].lower() == "data.pkl"]
        except (zipfile.LargeZipFile, ValueError, EOFError) as error:
            raise zipfile.BadZipFile(f"a zip archive whose directory is unreadable: {error}") from error
        for pickled in pickles:
            _size_checking_unpickler(io.BytesIO(pickled), limit).load()
    finally:
        file.seek(start)


def contains_dropped(obj: Any, _depth: int = 0) -> bool:
    """Whether a loaded object holds a ``Dropped`` placeholder anywhere in its containers."""
    if isinstance(obj, Dropped) or (isinstance(obj, type) and issubclass(obj, Dropped)):
        return True
    if _depth > 100:
        return True  # implausibly deep for a state dict: treat as not rebuilt
    if isinstance(obj, dict):
        return any(contains_dropped(k, _depth + 1) or contains_dropped(v, _depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(contains_dropped(v, _depth + 1) for v in obj)
    return False
