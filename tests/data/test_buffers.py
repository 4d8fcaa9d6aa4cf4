"""Big CPU batch buffers: huge-page mappings and the recycling pool (ownership: never reuse memory in use)."""

from __future__ import annotations

import gc
import pickle

import pytest
import torch

import raml.data.buffers as buffers
from raml.data.buffers import HUGE_PAGE_BYTES, BufferPool, huge_pages_available

BIG = (3, 1024, 1024)  # 3 MiB of uint8, 12 MiB of float32: above one huge page


@pytest.mark.parametrize("available", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_pool_buffer_is_usable_correctly_sized_and_zero_copy(monkeypatch, available, dtype):
    # available=False: no madvise (not Linux), the buffer is a bytearray
    monkeypatch.setattr(buffers, "huge_pages_available", lambda: available and huge_pages_available())
    pool = BufferPool()
    x = pool.empty(BIG, dtype)
    assert x.shape == BIG and x.dtype == dtype and x.is_contiguous() and x.device.type == "cpu"
    assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
    if available and huge_pages_available():
        assert x.data_ptr() % HUGE_PAGE_BYTES == 0  # starts on a huge-page boundary
    del pool
    gc.collect()  # no Python reference to the memory but the tensor's: it must stay alive
    x.fill_(7)
    x[1, 2, 3] = 1
    assert int(x.sum()) == 7 * x.numel() - 6
    x.numpy()[0, 0, 0] = 3  # zero-copy: numpy sees the same memory
    assert int(x[0, 0, 0]) == 3
    with pytest.raises(ValueError, match="non-negative"):
        BufferPool().empty((2, -1), torch.uint8)


@pytest.mark.parametrize("available", [True, False])
def test_pool_reuses_memory_only_once_no_tensor_views_it(monkeypatch, available):
    monkeypatch.setattr(buffers, "huge_pages_available", lambda: available)
    pool = BufferPool(capacity=2)
    a = pool.empty(BIG, torch.uint8)
    a.fill_(1)
    b = pool.empty(BIG, torch.uint8)  # a is alive: new memory, a untouched
    b.fill_(2)
    assert a.data_ptr() != b.data_ptr() and pool.created == 2
    assert int(a.sum()) == a.numel()
    view = a[1:]  # a view keeps the memory in use
    address = a.data_ptr()
    del a
    c = pool.empty(BIG, torch.uint8)
    assert c.data_ptr() not in (address, b.data_ptr()) and pool.created == 3
    assert int(view.sum()) == view.numel()
    del view
    d = pool.empty(BIG, torch.uint8)  # now a's memory is free: recycled, nothing created
    assert d.data_ptr() == address and pool.created == 3
    # another dtype of the same byte size reuses memory too
    del d
    e = pool.empty((3, 256, 1024), torch.float32)
    assert e.data_ptr() == address and e.shape == (3, 256, 1024)


def test_pool_keeps_at_most_capacity_idle_buffers():
    pool = BufferPool(capacity=1)
    held = [pool.empty(BIG, torch.uint8) for _ in range(3)]
    del held
    assert sum(len(v) for v in pool._idle.values()) == 1
    pool.empty(BIG, torch.uint8)
    assert pool.created == 3


def test_pool_small_requests_and_layouts():
    pool = BufferPool()
    assert pool.empty((2, 3), torch.float32).shape == (2, 3) and pool.created == 0
    channels_last = torch.empty(2, 4, 256, 256, 3, dtype=torch.uint8).permute(0, 1, 4, 2, 3)
    out = pool.empty_like(channels_last, torch.float32)
    reference = torch.empty_like(channels_last, dtype=torch.float32, memory_format=torch.preserve_format)
    assert out.shape == channels_last.shape and out.stride() == reference.stride() and out.dtype == torch.float32
    strided = torch.empty(2, 4, 3, 512, 512, dtype=torch.uint8)[:, :, :, ::2]  # not dense: C-contiguous result
    assert pool.empty_like(strided).is_contiguous() and pool.empty_like(strided).shape == strided.shape
    with pytest.raises(ValueError, match="capacity"):
        BufferPool(capacity=-1)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(pool)
