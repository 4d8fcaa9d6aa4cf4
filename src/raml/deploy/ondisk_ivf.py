"""IVF indexes whose inverted lists live in a file (faiss ``OnDiskInvertedLists``): built from parts, served mmapped.

Contract:
    ``build_ondisk_ivf(template, chunks, ivfdata, scratch)`` -> an IVF index equal to ``template`` (an empty,
    trained IVF / IVF-PQ index) with every ``(rows (n, D) float32, ids (n,) int64)`` chunk added, whose lists
    are stored in the file ``ivfdata``. The chunks are encoded into part indexes of ``part_rows`` vectors (same
    trained quantiser), each written to a part file under ``scratch`` and emptied; the parts are then merged,
    list by list, into ``ivfdata`` through memory maps (faiss's ``OnDiskInvertedLists.merge_from_multiple``).
    Memory is one chunk's rows and one part's codes, not the whole index. ``extend_ondisk_ivf`` builds the
    next version of such an index (some ids removed, new chunks added) into a new file the same way, without
    touching the old file, which readers may still be serving. ``empty_copy(index)`` -> the trained quantiser
    of an IVF index without its vectors.

Search results equal those of the in-memory index that adds the same chunks in the same order to the same
trained template: the lists hold the same codes and ids in the same order (tested: ids and distances).

The written ``.faiss`` file names its lists file; :func:`set_lists_name` sets that name to the file's base name
so that ``faiss.read_index(path, IO_FLAG_ONDISK_SAME_DIR | IO_FLAG_READ_ONLY)`` finds it next to the
``.faiss`` file wherever the folder is moved, and maps it read-only (the pages are shared by every process
that loads it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raml.deploy.faiss_index import add_with_ids, import_faiss

logger = logging.getLogger(__name__)

DEFAULT_PART_ROWS = 1 << 20
"""Vectors per part index of an on-disk build: 72 MiB of codes and ids for IVF-PQ with m = 64."""

__all__ = ["build_ondisk_ivf", "empty_copy", "extend_ondisk_ivf", "is_ondisk", "lists_file", "set_lists_name"]


def _ivf(index: Any) -> Any:
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError) as error:
        kind = type(index).__name__
        raise ValueError(f"On-disk inverted lists need an IVF index (ivf, ivfpq), got {kind}.") from error


def is_ondisk(index: Any) -> bool:
    """Whether ``index`` is an IVF index whose lists are a faiss ``OnDiskInvertedLists`` (a mapped file)."""
    faiss = import_faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return False
    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def lists_file(index: Any) -> str:
    """The lists file an on-disk IVF index names."""
    faiss = import_faiss()
    return str(faiss.downcast_InvertedLists(_ivf(index).invlists).filename)


def set_lists_name(index: Any, name: str) -> None:
    """Make the on-disk index name its lists file ``name`` (a base name: the file sits next to the ``.faiss``)."""
    faiss = import_faiss()
    if not is_ondisk(index):
        raise ValueError("set_lists_name needs an index with on-disk inverted lists.")
    faiss.downcast_InvertedLists(_ivf(index).invlists).filename = name


def empty_copy(index: Any) -> Any:
    """A copy of the IVF ``index`` with its trained quantiser (and PQ) and no vectors, its lists in memory."""
    faiss = import_faiss()
    ivf = _ivf(index)
    lists, owned, ntotal = ivf.invlists, ivf.own_invlists, index.ntotal
    # clone_index cannot copy on-disk lists: swap in empty lists for the copy, then put the original back
    ivf.own_invlists = False
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, False)
    index.ntotal = ivf.ntotal = 0
    try:
        copy = faiss.clone_index(index)
    finally:
        ivf.replace_invlists(lists, owned)
        index.ntotal = ivf.ntotal = ntotal
    return copy


def _write_parts(
    template: Any, chunks: Iterable[tuple[np.ndarray, np.ndarray]], scratch: Path, part_rows: int, first: int = 0
) -> list[Path]:
    """The chunks encoded, in order, into copies of ``template`` of about ``part_rows`` vectors each, written to
    part files; one chunk of rows and one part's codes in memory at a time."""
    faiss = import_faiss()
    scratch.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    part = faiss.clone_index(template)  # one copy of the quantiser, emptied after each part

    def flush() -> None:
        parts.append(scratch / f"part-{first + len(parts):06d}.faiss")
        faiss.write_index(part, str(parts[-1]))
        part.reset()

    for rows, ids in chunks:
        if len(ids):
            add_with_ids(part, rows, ids)
        if part.ntotal >= part_rows:
            flush()
    if part.ntotal:
        flush()
    return parts


def _merge(template: Any, sources: Sequence[Any], ivfdata: Path) -> Any:
    """A copy of the empty ``template`` whose lists are the concatenation of ``sources`` (InvertedLists), list by
    list in source order, stored in the new file ``ivfdata``."""
    faiss = import_faiss()
    if template.ntotal != 0:
        raise ValueError("The template of an on-disk merge must be empty.")
    index = faiss.clone_index(template)
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    vector = faiss.InvertedListsPtrVector()
    for source in sources:
        vector.push_back(source)
    ntotal = lists.merge_from_multiple(vector.data(), vector.size()) if len(sources) else 0
    index.ntotal = ivf.ntotal = int(ntotal)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    return index


def _merge_parts(template: Any, parts: Sequence[Path], ivfdata: Path) -> Any:
    faiss = import_faiss()
    readers = []  # the part indexes, mapped (IO_FLAG_MMAP: their lists are read from the file, not loaded)
    sources = []
    for path in parts:
        part = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        readers.append(part)
        sources.append(faiss.extract_index_ivf(part).invlists)
    logger.info("Merging %d part(s) into the on-disk lists %s", len(sources), ivfdata)
    index = _merge(template, sources, ivfdata)
    del readers, sources
    return index


def build_ondisk_ivf(
    template: Any,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    ivfdata: Path,
    scratch: Path,
    part_rows: int = DEFAULT_PART_ROWS,
) -> Any:
    """An IVF index with ``template``'s quantiser holding every chunk, its lists stored in ``ivfdata``.

    Args:
        template: An empty, trained IVF / IVF-PQ index (inner product).
        chunks: ``(rows (n, D) float32, ids (n,) int64)`` pairs, added in order.
        ivfdata: The lists file to create (it must not exist).
        scratch: A folder for the part files; they are removed before returning.
        part_rows: Vectors per part index (one part's codes are in memory at a time; fewer, larger parts
            merge faster: the merge visits every list of every part).

    Returns:
        The index (its lists mapped read-write from ``ivfdata``; :func:`set_lists_name` before writing it).
    """
    if not template.is_trained or template.ntotal != 0:
        raise ValueError("build_ondisk_ivf needs an empty, trained IVF index as the template.")
    parts = _write_parts(template, chunks, scratch, part_rows)
    try:
        return _merge_parts(template, parts, ivfdata)
    finally:
        for path in parts:
            path.unlink(missing_ok=True)


def _list_entries(lists: Any, list_no: int, code_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Copies of the ids ``(n,)`` and codes ``(n, code_size)`` of one inverted list."""
    faiss = import_faiss()
    n = int(lists.list_size(list_no))
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, code_size), dtype=np.uint8)
    ids_ptr, codes_ptr = lists.get_ids(list_no), lists.get_codes(list_no)
    try:
        ids = faiss.rev_swig_ptr(ids_ptr, n).copy()
        codes = faiss.rev_swig_ptr(codes_ptr, n * code_size).copy().reshape(n, code_size)
    finally:
        lists.release_ids(list_no, ids_ptr)
        lists.release_codes(list_no, codes_ptr)
    return ids, codes


def _remove_in_list(ids: np.ndarray, codes: np.ndarray, remove: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` and ``codes`` of one list without the ids in ``remove``, in the order faiss's in-place removal
    leaves them (a removed entry is overwritten by the list's last one, which is then checked in turn)."""
    if not np.isin(ids, remove).any():
        return ids, codes
    removed = set(remove[np.isin(remove, ids)].tolist())
    ids, codes = ids.copy(), codes.copy()
    size, j = len(ids), int(np.argmax(np.isin(ids, remove)))
    while j < size:
        if int(ids[j]) in removed:
            size -= 1
            ids[j], codes[j] = ids[size], codes[size]
        else:
            j += 1
    return ids[:size], codes[:size]


def _kept_parts(index: Any, remove: np.ndarray, scratch: Path, group_rows: int) -> list[Path]:
    """The lists of ``index`` without the ids ``remove``, as part files of whole lists holding about
    ``group_rows`` entries each (one part in memory at a time)."""
    faiss = import_faiss()
    ivf = _ivf(index)
    source = ivf.invlists
    part = empty_copy(index)  # emptied after each part written
    part_ivf = faiss.extract_index_ivf(part)
    scratch.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    for list_no in range(ivf.nlist):
        ids, codes = _remove_in_list(*_list_entries(source, list_no, ivf.code_size), remove)
        if len(ids):
            part_ivf.invlists.add_entries(
                list_no, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(np.ascontiguousarray(codes))
            )
            part.ntotal = part_ivf.ntotal = part.ntotal + len(ids)
        if part.ntotal and (part.ntotal >= group_rows or list_no == ivf.nlist - 1):
            parts.append(scratch / f"kept-{len(parts):06d}.faiss")
            faiss.write_index(part, str(parts[-1]))
            part.reset()
    return parts


def extend_ondisk_ivf(
    index: Any,
    remove: np.ndarray,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    ivfdata: Path,
    scratch: Path,
    part_rows: int = DEFAULT_PART_ROWS,
) -> Any:
    """The next version of an IVF ``index`` (lists on disk or in memory) in the new lists file ``ivfdata``:
    its vectors without the ids ``remove``, then the chunks. ``index`` and its file are not modified (readers
    may be serving it).

    The kept lists are copied a group of lists (about ``part_rows`` entries) at a time into part files, the
    chunks encoded into further parts, and all parts merged into ``ivfdata``, as for a new build: faiss's
    merged on-disk lists are never modified in place (their free-space bookkeeping does not survive a merge,
    so growing a list there would overwrite another). Each list ends up as the in-memory update leaves it
    (removed entries replaced by the list's last one, then the new vectors in chunk order), so searches return
    the same results.
    """
    remove = np.unique(np.asarray(remove, dtype=np.int64))
    template = empty_copy(index)
    parts: list[Path] = []
    try:
        parts += _kept_parts(index, remove, scratch, part_rows)
        parts += _write_parts(template, chunks, scratch, part_rows, first=len(parts))
        return _merge_parts(template, parts, ivfdata)
    finally:
        for path in parts:
            path.unlink(missing_ok=True)
