"""Order statistics for the analysis: whole-model (streamed) and per-tensor (in memory).

The positions are the methods' own (`merging.kernels.select`: TIES trim, PCB
clamp and drop), counted in the full model, so an exact analysis finds the very
thresholds a merge would use. On a sample every analysed element stands for
`weight` elements of its tensor, and the value at position p is the smallest v
whose weighted count of values <= v exceeds p: the plain order statistic when
all weights are 1, its unbiased estimate otherwise.

`WeightedSelect` streams: pass 1 counts the top 16 bits of order-preserving
keys (`merging.kernels.keys`), pass 2 the low 16 bits inside the bins that hold
the wanted positions. Counts are float64, exact for integers below 2**53.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..kernels.keys import float_to_key, key_to_float

_BINS = 1 << 16
_FLUSH = 1 << 22  # pending pass-2 hits per stream before they are counted


def keys_of(values: torch.Tensor) -> np.ndarray:
    """uint32 order-preserving keys of float32 values (any device)."""
    return float_to_key(values.detach().to("cpu", torch.float32).numpy())


class WeightedSelect:
    """Weighted order statistics of `n` value streams, exact in two passes."""

    def __init__(self, n: int):
        self.n = n
        self.total = np.zeros(n)
        self._hi = np.zeros((n, _BINS))
        self._positions: list[list[float]] | None = None
        self._prefix: list[np.ndarray] = []
        self._residual: list[np.ndarray] = []
        self._lut: list[np.ndarray] = []
        self._lo: list[np.ndarray] = []
        self._pending: list[list[tuple[np.ndarray, float]]] = []
        self._pending_size: list[int] = []

    # pass 1 -----------------------------------------------------------------
    def add_hi(self, i: int, keys: np.ndarray, weight: float) -> None:
        self._hi[i] += np.bincount(keys >> 16, minlength=_BINS) * weight
        self.total[i] += keys.size * weight

    def set_positions(self, positions: list[list[float]]) -> None:
        """Fix the wanted ascending positions (0-indexed, in weighted count) of each stream."""
        self._positions = positions
        for i, wanted in enumerate(positions):
            cum = np.cumsum(self._hi[i])
            last = int(np.flatnonzero(self._hi[i])[-1]) if cum[-1] > 0 else 0
            prefix = np.empty(len(wanted), np.int64)
            residual = np.empty(len(wanted))
            for j, pos in enumerate(wanted):
                b = min(int(np.searchsorted(cum, pos, side="right")), last)
                prefix[j] = b
                residual[j] = pos - (cum[b - 1] if b > 0 else 0.0)
            slots = np.unique(prefix)
            lut = np.full(_BINS, -1, np.int64)
            lut[slots] = np.arange(slots.size)
            self._prefix.append(prefix)
            self._residual.append(residual)
            self._lut.append(lut)
            self._lo.append(np.zeros((slots.size, _BINS)))
            self._pending.append([])
            self._pending_size.append(0)

    # pass 2 -----------------------------------------------------------------
    def add_lo(self, i: int, keys: np.ndarray, weight: float) -> None:
        slot = self._lut[i][keys >> 16]
        hit = slot >= 0
        if not hit.any():
            return
        flat = slot[hit] * _BINS + (keys[hit] & 0xFFFF)
        self._pending[i].append((flat, weight))
        self._pending_size[i] += flat.size
        if self._pending_size[i] >= _FLUSH:
            self._flush(i)

    def _flush(self, i: int) -> None:
        """Count the pending hits of stream i (few per tensor: one bincount per many tensors)."""
        if not self._pending[i]:
            return
        flat = np.concatenate([f for f, _ in self._pending[i]])
        weights = np.concatenate([np.full(f.size, w) for f, w in self._pending[i]])
        self._lo[i] += np.bincount(flat, weights=weights, minlength=self._lo[i].size).reshape(self._lo[i].shape)
        self._pending[i].clear()
        self._pending_size[i] = 0

    def values(self) -> list[list[float]]:
        assert self._positions is not None, "set_positions first"
        for i in range(self.n):
            self._flush(i)
        out = []
        for i, wanted in enumerate(self._positions):
            row = []
            for j in range(len(wanted)):
                prefix = int(self._prefix[i][j])
                hist = self._lo[i][int(self._lut[i][prefix])]
                cum = np.cumsum(hist)
                nonzero = np.flatnonzero(hist)
                last = int(nonzero[-1]) if nonzero.size else 0
                low = min(int(np.searchsorted(cum, self._residual[i][j], side="right")), last)
                row.append(key_to_float((prefix << 16) | low))
            out.append(row)
        return out


def local_order_stats(values: np.ndarray, weight: float, positions: list[float]) -> list[float]:
    """Values at population positions of one tensor's analysed elements (all share one weight)."""
    m = values.size
    if m == 0:
        return [0.0 for _ in positions]
    index = sorted({min(m - 1, max(0, math.floor(p / weight))) for p in positions})
    part = np.partition(values, index) if len(index) < 64 else np.sort(values)
    return [float(part[min(m - 1, max(0, math.floor(p / weight)))]) for p in positions]
