"""BufferPool: memory is reused only when nothing refers to it any more."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging import buffers
from merging.buffers import BufferPool, size_class

MB = 1 << 20


def test_size_classes_waste_under_an_eighth() -> None:
    for nbytes in [1, 7, 1000, MB, MB + 1, 3 * MB + 12345, 135 * MB, 2**33 + 5]:
        cls = size_class(nbytes)
        assert nbytes <= cls < nbytes * 1.125 + 1
    assert size_class(45 * MB) == size_class(44 * MB + 1)  # neighbours share a class


def test_a_buffer_is_reused_once_every_tensor_and_view_of_it_is_gone() -> None:
    pool = BufferPool()
    a = pool.empty((512, 1024), torch.float32)
    a.fill_(3.0)
    where = a.data_ptr()
    row = a[7]
    as_numpy = a.numpy()[1:3]
    del a
    assert pool.empty((512, 1024), torch.float32).data_ptr() != where  # a view still holds it
    del row
    assert pool.empty((512, 1024), torch.float32).data_ptr() != where  # and a NumPy view
    del as_numpy
    again = pool.empty((1024, 512), torch.float32)  # another shape of the same class
    assert again.data_ptr() == where and again.shape == (1024, 512) and again.is_contiguous()
    assert pool.allocated == 2 and pool.reused == 2  # the discarded second buffer served the third request


def test_dtypes_and_near_sizes_share_memory_and_the_view_is_exact() -> None:
    pool = BufferPool()
    a = pool.empty((3, 1000, 1000), torch.float32)
    where = a.data_ptr()
    del a
    b = pool.empty((5_900_000,), torch.bfloat16)  # 11.8 MB: the 12 MB class of the first one
    assert b.data_ptr() == where and b.dtype == torch.bfloat16 and b.numel() == 5_900_000


def test_small_tensors_are_plain_allocations() -> None:
    pool = BufferPool()
    t = pool.empty((10, 10), torch.float64)
    assert t.shape == (10, 10) and t.dtype == torch.float64
    assert pool.allocated == 0 and pool.held_bytes == 0


def test_free_buffers_are_capped_per_class_and_released_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffers, "MAX_FREE_PER_CLASS", 1)
    pool = BufferPool(max_idle_requests=3)
    held = [pool.empty((MB,), torch.float32) for _ in range(3)]  # three 4 MB buffers in use
    assert pool.held_bytes == 12 * MB
    held.clear()
    pool.empty((MB // 2,), torch.float32)  # another class; the three free ones are trimmed to one
    assert pool.held_bytes == 4 * MB + 2 * MB
    for _ in range(3):
        pool.empty((MB // 2,), torch.float32)  # three more requests: the 4 MB one is idle now
    assert pool.held_bytes == 2 * MB


def test_a_reused_buffer_keeps_no_old_view_alive_by_mistake() -> None:
    """Everything handed out while earlier tensors live must be distinct memory."""
    pool = BufferPool()
    live = [pool.empty((MB,), torch.float32) for _ in range(5)]
    for i, t in enumerate(live):
        t.fill_(float(i))
    more = [pool.empty((MB,), torch.float32) for _ in range(5)]
    for t in more:
        t.fill_(-1.0)
    assert [float(t[0]) for t in live] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert len({t.data_ptr() for t in live + more}) == 10
    np.testing.assert_array_equal(live[2].numpy(), np.full(MB, 2.0, np.float32))
