"""Recycled CPU buffers for the tensors a merge reads.

A fresh large allocation comes straight from the OS, and every one of its pages
faults (and is zeroed) on first touch: reading a tensor from the page cache
into a fresh buffer is about 3x slower than into a buffer used before. The
executor reads every input tensor once per pass, so it takes its buffers from
a pool. A buffer is handed out again only when no tensor, view or NumPy array
refers to its memory any more: each buffer is a NumPy array whose reference
count says so, which makes reuse safe whoever kept a view of a merged tensor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

# Below this a plain allocation is cheap (the C allocator keeps such blocks).
MIN_POOLED_BYTES = 1 << 20
# A free buffer not handed out during this many requests is released.
MAX_IDLE_REQUESTS = 16
# Free buffers kept per size class: enough for a reader a few tensors ahead of the merge
# to find one free (alike tensors, e.g. q and o or gate, up and down, share a class);
# each one kept raises the peak memory by its size.
MAX_FREE_PER_CLASS = 2


def size_class(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of 1/16 of the next power of two (under 12.5% unused), so near sizes share buffers."""
    step = max(1, (1 << max(nbytes - 1, 1).bit_length()) // 16)
    return -(-nbytes // step) * step


@dataclass(eq=False)
class _Entry:
    array: np.ndarray
    last_used: int

    def references(self) -> int:
        return sys.getrefcount(self.array)

    def is_free(self) -> bool:
        return self.references() <= _POOL_REFS


# What `references()` counts when only the pool holds the array (measured, not assumed).
_POOL_REFS = _Entry(np.empty(0, np.uint8), 0).references()


class BufferPool:
    """Hands out uninitialised CPU tensors, reusing the memory of ones nobody holds any more."""

    def __init__(self, *, max_idle_requests: int = MAX_IDLE_REQUESTS):
        self.max_idle = max_idle_requests
        self._entries: dict[int, list[_Entry]] = {}
        self._requests = 0
        self.allocated = 0  # pooled allocations made (for tests and benchmarks)
        self.reused = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Like `torch.empty(shape, dtype=dtype)`: contiguous, contents undefined."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < MIN_POOLED_BYTES:
            return torch.empty(shape, dtype=dtype)
        self._requests += 1
        cls = size_class(nbytes)
        entry = next((e for e in self._entries.get(cls, ()) if e.is_free()), None)
        if entry is None:
            entry = _Entry(np.empty(cls, np.uint8), self._requests)
            self._entries.setdefault(cls, []).append(entry)
            self.allocated += 1
        else:
            self.reused += 1
        entry.last_used = self._requests
        tensor = torch.from_numpy(entry.array[:nbytes]).view(dtype).view(shape)
        self._trim()
        return tensor

    def _trim(self) -> None:
        """Release free buffers idle too long, and the least recently used beyond the per-class cap."""
        oldest = self._requests - self.max_idle
        for cls in list(self._entries):
            group = self._entries[cls]
            free = sorted((e for e in group if e.is_free()), key=lambda e: e.last_used, reverse=True)
            drop = {id(e) for i, e in enumerate(free) if i >= MAX_FREE_PER_CLASS or e.last_used <= oldest}
            if drop:
                group[:] = [e for e in group if id(e) not in drop]
                if not group:
                    del self._entries[cls]

    @property
    def held_bytes(self) -> int:
        """Bytes of every buffer the pool tracks, in use or free."""
        return sum(e.array.nbytes for entries in self._entries.values() for e in entries)
