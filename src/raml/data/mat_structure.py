"""The sizes a MATLAB (MAT 5) file declares, checked against the bytes it holds before ``scipy.io`` reads it.

``scipy.io.loadmat`` allocates a cell or struct array at the size its header declares (``np.empty(dims, object)``)
before it reads one element: a few bytes declaring a cell of 2^31 entries cost 16 GB. The inflated size of the
file is bounded first (``raml.data.splits``); :func:`check_declared_sizes` then walks its elements, inflated, and
refuses any array that declares more entries than the bytes left to hold them (an entry of a cell or struct is an
element of at least 8 bytes, a number or a character at least 1 byte) or that is nested deeper than ``max_depth``.

It refuses only what cannot be a real file; anything it cannot follow (a damaged element, an unknown layout) is
left to ``scipy.io``, which reports it. Layout (MathWorks, "MAT-File Format", 2019): a 128-byte header, then
elements, each an 8-byte tag (type, byte count; or a "small" 4-byte tag with up to 4 bytes of data) and its data
padded to 8 bytes; a ``miCOMPRESSED`` element holds one zlib-compressed element; a ``miMATRIX`` holds the array
flags, the dimensions, the name, then per class: a cell its entries, a struct (or object, after its class name) the
field-name length, the names, and entries x fields elements, a numeric or character array its data.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

__all__ = ["MatStructureError", "check_declared_sizes"]

_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_CELL, _STRUCT, _OBJECT, _SPARSE = 1, 2, 3, 5
_TAG = 8


class MatStructureError(ValueError):
    """A MAT file declares an array larger than the bytes it holds could fill, or nests arrays too deep."""


class _CannotFollow(Exception):
    """The walk cannot follow the file's layout: left to ``scipy.io``."""


def _tag(buf: bytes, pos: int, end: int, order: str) -> tuple[int, int, int, int]:
    """``(type, byte count, data start, next element)`` of the element at ``pos`` (which must end by ``end``)."""
    if pos + _TAG > end:
        raise _CannotFollow
    first, second = struct.unpack_from(order + "II", buf, pos)
    if first >> 16:  # small element: the byte count in the upper half, the data in the tag's second word
        count = first >> 16
        if count > 4:
            raise _CannotFollow
        return first & 0xFFFF, count, pos + 4, pos + _TAG
    start = pos + _TAG
    if start + second > end:
        raise _CannotFollow
    return first, second, start, min(end, start + second + (-second % 8))


def _walk_matrix(buf: bytes, start: int, end: int, order: str, max_depth: int, where: str) -> None:
    """Check the ``miMATRIX`` body ``buf[start:end]`` and every array nested in it, depth first without recursion:
    one frame per open cell or struct (at most ``max_depth``), whatever the number of their entries."""
    frames: list[list[int]] = []  # per open cell or struct: [position of its next entry, its end, depth, entries left]
    array: tuple[int, int, int] | None = (start, end, 1)
    while True:
        if array is not None:
            try:
                opened = _check_one(buf, *array, order, max_depth, where)
            except _CannotFollow:  # this array is left to scipy; its siblings are still checked
                opened = None
            if opened is not None:
                frames.append(opened)
            array = None
        if not frames:
            return
        frame = frames[-1]
        pos, stop, depth, left = frame
        if not left:
            frames.pop()
            continue
        try:
            kind, count, data, following = _tag(buf, pos, stop, order)
        except _CannotFollow:
            kind = None
        if kind != _MI_MATRIX:  # the rest of this container is left to scipy
            frames.pop()
            continue
        frame[0], frame[3] = following, left - 1
        if count:
            array = (data, data + count, depth + 1)


def _check_one(buf: bytes, pos: int, stop: int, depth: int, order: str, max_depth: int, where: str) -> list[int] | None:
    """Check the array ``buf[pos:stop]`` (a ``miMATRIX`` body): for a cell or struct with entries, the frame
    ``[position of its first entry, stop, depth, entries]`` to walk them; else None."""
    kind, count, data, pos = _tag(buf, pos, stop, order)
    if kind != _MI_UINT32 or count < 4:
        raise _CannotFollow
    array_class = struct.unpack_from(order + "I", buf, data)[0] & 0xFF
    kind, count, data, pos = _tag(buf, pos, stop, order)
    if kind != _MI_INT32 or count % 4:
        raise _CannotFollow
    dims = struct.unpack_from(order + f"{count // 4}i", buf, data)
    if any(d < 0 for d in dims):
        raise _CannotFollow
    entries = math.prod(dims)
    kind, count, data, pos = _tag(buf, pos, stop, order)  # the array's name
    if array_class in (_CELL, _STRUCT, _OBJECT):
        fields = 1
        if array_class == _OBJECT:
            kind, count, data, pos = _tag(buf, pos, stop, order)  # its class name
        if array_class in (_STRUCT, _OBJECT):
            kind, count, data, pos = _tag(buf, pos, stop, order)
            if kind != _MI_INT32 or count != 4:
                raise _CannotFollow
            name_length = struct.unpack_from(order + "i", buf, data)[0]
            kind, count, data, pos = _tag(buf, pos, stop, order)
            fields = count // name_length if name_length > 0 else 0
        children = entries * fields
        if children * _TAG > stop - pos:
            raise MatStructureError(
                f"{where} declares a {'x'.join(map(str, dims))} {_class_name(array_class)} array"
                f"{f' of {fields} fields' if array_class != _CELL else ''} ({children} elements) in "
                f"{stop - pos} bytes, which can hold at most {(stop - pos) // _TAG}"
            )
        if children and depth >= max_depth:
            raise MatStructureError(f"{where} nests arrays more than {max_depth} deep")
        return [pos, stop, depth, children] if children else None
    if array_class != _SPARSE and entries > stop - pos:  # a sparse array stores its non-zeros only
        raise MatStructureError(
            f"{where} declares a {'x'.join(map(str, dims))} {_class_name(array_class)} array ({entries} "
            f"values) in {stop - pos} bytes"
        )
    return None


def _class_name(array_class: int) -> str:
    names = {_CELL: "cell", _STRUCT: "struct", _OBJECT: "object", 4: "char"}
    return names.get(array_class, "numeric")


def check_declared_sizes(path: Path, max_inflated: int, max_depth: int = 32) -> None:
    """Refuse a MAT 5 file whose arrays declare more entries than its bytes hold, or nest deeper than
    ``max_depth``. Call it once the file is known to hold at most ``max_inflated`` bytes inflated (each
    compressed element is inflated whole, one at a time, and never past that).

    Raises:
        MatStructureError: naming the file and the array's declared size.
    """
    data = path.read_bytes()
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        return  # not MAT 5: scipy.io says what is wrong
    order = "<" if data[126:128] == b"IM" else ">"
    pos = 128
    while pos + _TAG <= len(data):
        try:
            kind, count, start, following = _tag(data, pos, len(data), order)
        except _CannotFollow:
            return  # where the next variable starts is unknown: scipy cannot read past here either
        if kind == _MI_COMPRESSED:
            following = start + count  # no padding after a compressed element
        try:  # each variable on its own: scipy skips the variables it is not asked for by their byte counts
            if kind == _MI_COMPRESSED:
                inner = zlib.decompressobj().decompress(data[start:following], max_inflated + 1)
                if len(inner) > max_inflated:
                    raise _CannotFollow  # the size check before this one refuses it
                inner_kind, inner_count, inner_start, _ = _tag(inner, 0, len(inner), order)
                if inner_kind == _MI_MATRIX and inner_count:
                    _walk_matrix(inner, inner_start, inner_start + inner_count, order, max_depth, str(path))
            elif kind == _MI_MATRIX and count:
                _walk_matrix(data, start, start + count, order, max_depth, str(path))
        except (_CannotFollow, zlib.error, struct.error):
            pass
        pos = following
