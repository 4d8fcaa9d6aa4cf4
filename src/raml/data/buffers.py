"""Big CPU batch buffers: recycled once no tensor uses them, and hinted for huge pages.

A batch of coupled views is large (the mixed float32 teacher batch of 64 views at 448 px is 154 MB) and a fresh
allocation of that size is a new anonymous mapping: the first write of every 4 KiB page is a page fault, which
costs more than the write itself. Measured on the 2-vCPU VM of docs/benchmarks.md (core 0, best of 5, load
~2): filling a fresh 154 MB ``torch.empty`` took 65-76 CPU-ms, the same fill of an already-touched buffer
7.3-7.7 CPU-ms, of a fresh mapping hinted ``MADV_HUGEPAGE`` 17 CPU-ms (but inside the data pipeline the
hinted fresh mappings cost more system time than they saved: the kernel compacts memory for them on a busy
machine, docs/benchmarks.md). So the pipeline recycles its buffers:

- :class:`BufferPool` hands out tensors over memory it keeps, and hands a piece of memory out again only once
  every tensor viewing it has been freed (``torch.frombuffer`` keeps the ``memoryview`` it wraps alive as long
  as the storage lives; a ``weakref.finalize`` on that ``memoryview`` returns the memory to the pool). A batch
  the caller still holds is therefore never overwritten; the pool keeps at most ``capacity`` idle buffers of
  each size and lets the others go.
- each of the pool's buffers is a mapping of its own (an anonymous private ``mmap``, over-allocated by 2 MiB so
  the buffer starts on a huge-page boundary, hinted ``MADV_HUGEPAGE`` where the kernel's transparent huge
  pages are in ``madvise`` mode): it faults in 2 MiB pages the one time it is created. The hint is per
  mapping: nothing process-wide changes. Where it does not exist (not Linux), a ``bytearray``.

Contract: a shape and a dtype -> an uninitialised C-contiguous CPU tensor of them (``empty_like``: in the
tensor's memory layout), which keeps its memory alive.
"""

from __future__ import annotations

import logging
import math
import mmap
import threading
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["HUGE_PAGE_BYTES", "BufferPool", "huge_pages_available"]

#: The size of a transparent huge page on x86-64 and most arm64 kernels (2 MiB).
HUGE_PAGE_BYTES = 2 << 20


def huge_pages_available() -> bool:
    """Whether this Python can ask for huge pages per mapping (``mmap.MADV_HUGEPAGE`` exists: Linux)."""
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap.mmap, "madvise")


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative dimensions, got {shape}.")
    return shape


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _huge_mapping(nbytes: int) -> memoryview:
    """``nbytes`` of fresh private anonymous memory starting on a huge-page boundary, hinted for huge pages."""
    # Private memory (a shared anonymous mapping would be shmem, whose huge pages are a separate setting), one
    # huge page more than needed so that the buffer can start on a huge-page boundary.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError as err:  # a kernel built without transparent huge pages: ordinary pages then
        logger.debug("madvise(MADV_HUGEPAGE) refused (%s); using ordinary pages", err)
    address = np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    offset = (-address) % HUGE_PAGE_BYTES
    return memoryview(mapping)[offset : offset + nbytes]  # keeps the mapping alive


class BufferPool:
    """Recycles big CPU buffers: memory is handed out again only once no tensor views it any more.

    Thread-safe. Not picklable on purpose (a ``DataLoader`` worker gets none: see
    :meth:`raml.data.views.CoupledViewDataset.batch`).

    Args:
        capacity: Idle buffers kept per size (a caller that holds the previous batch while the next is made
            needs twice the buffers of one size per batch; more are freed as they come back).
        min_bytes: Smaller requests get a plain ``torch.empty`` (recycling pays off for big buffers).
    """

    def __init__(self, capacity: int = 4, min_bytes: int = HUGE_PAGE_BYTES) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative integer, got {capacity!r}.")
        self.capacity = capacity
        self.min_bytes = int(min_bytes)
        self._idle: dict[int, list[memoryview]] = {}
        self._lock = threading.RLock()
        self.created = 0  # buffers made (not recycled), for tests and reports

    def __reduce__(self):
        raise TypeError("A BufferPool holds this process's memory and cannot be pickled; make one per process.")

    def _release(self, memory: memoryview) -> None:
        with self._lock:
            idle = self._idle.setdefault(memory.nbytes, [])
            if len(idle) < self.capacity:
                idle.append(memory)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised C-contiguous CPU tensor: recycled memory if an idle buffer of its size exists.

        Raises:
            ValueError: On a negative dimension.
        """
        shape = _check_shape(shape)
        nbytes = math.prod(shape) * _itemsize(dtype)
        if nbytes < max(self.min_bytes, 1):
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            idle = self._idle.get(nbytes)
            memory = idle.pop() if idle else None
        if memory is None:
            memory = _huge_mapping(nbytes) if huge_pages_available() else memoryview(bytearray(nbytes))
            self.created += 1
        # A new memoryview per hand-out: torch.frombuffer keeps it alive exactly as long as the tensor's storage,
        # and its finalizer gives the memory back (the pool's own reference to it is dropped meanwhile).
        handed = memory[:]
        weakref.finalize(handed, self._release, memory)
        return torch.frombuffer(handed, dtype=dtype).view(shape)

    def empty_like(self, tensor: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """:meth:`empty` with the shape and memory layout (stride order) of a dense ``tensor``.

        As ``torch.empty_like(tensor, dtype=dtype, memory_format=torch.preserve_format)``: a tensor that is
        dense in some order of its dimensions (e.g. channels-last) gets the same strides; any other gets a
        C-contiguous result.
        """
        dtype = tensor.dtype if dtype is None else dtype
        dims = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))
        if not tensor.permute(dims).is_contiguous():
            return self.empty(tensor.shape, dtype)
        inverse = [dims.index(d) for d in range(tensor.dim())]
        return self.empty([tensor.shape[d] for d in dims], dtype).permute(inverse)
