"""Order-preserving integer keys for float32, and the radix-select bookkeeping.

An exact k-th value over data that never fits in memory is found by counting:
map every float32 to a uint32 *key* whose unsigned order is the float order,
count the top 16 bits of the keys (65,536 bins), find the bin that holds the
wanted rank, then count the low 16 bits of the keys inside that bin. Two
counting passes give the exact value; memory is a few histograms whatever the
size of the data. Both backends produce identical keys, so identical counts and
identical thresholds.

Key of x (after turning -0.0 into +0.0): bits(x) | 0x80000000 for x >= 0,
~bits(x) for x < 0.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

HI_BINS = 1 << 16
LO_BINS = 1 << 16
SIGN_BIT = np.uint32(0x80000000)


def float_to_key(x: np.ndarray) -> np.ndarray:
    """float32 array -> uint32 keys with the same order (−0.0 counts as +0.0)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    x = np.where(x == 0, np.float32(0.0), x)
    bits = x.view(np.uint32)
    return np.where(bits & SIGN_BIT, ~bits, bits | SIGN_BIT).astype(np.uint32)


def key_to_float(key: int) -> float:
    """The float32 value (as a Python float) whose key is `key`."""
    key = int(key) & 0xFFFFFFFF
    bits = key & 0x7FFFFFFF if key & 0x80000000 else (~key) & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def bin_for_position(hist: np.ndarray, position: int) -> tuple[int, int]:
    """Bin holding the `position`-th smallest value (0-indexed) and its rank inside the bin."""
    cum = np.cumsum(hist, dtype=np.int64)
    if position < 0 or position >= int(cum[-1]):
        raise ValueError(f"position {position} outside 0..{int(cum[-1]) - 1}")
    b = int(np.searchsorted(cum, position, side="right"))
    before = int(cum[b - 1]) if b > 0 else 0
    return b, position - before


@dataclass
class RankPlan:
    """Ascending positions wanted for each model: `positions[i]` is a list (may be empty)."""

    positions: list[list[int]]

    @property
    def n(self) -> int:
        return len(self.positions)

    @property
    def width(self) -> int:
        return max((len(p) for p in self.positions), default=0)


def resolve_hi(hist_hi: np.ndarray, plan: RankPlan) -> tuple[np.ndarray, np.ndarray]:
    """After the first counting pass: prefixes (n, K) int64 (−1 where unused) and residual ranks."""
    k = max(plan.width, 1)
    prefixes = np.full((plan.n, k), -1, dtype=np.int64)
    residual = np.zeros((plan.n, k), dtype=np.int64)
    for i, positions in enumerate(plan.positions):
        for j, pos in enumerate(positions):
            prefixes[i, j], residual[i, j] = bin_for_position(hist_hi[i], pos)
    return prefixes, residual


def resolve_lo(hist_lo: np.ndarray, plan: RankPlan, prefixes: np.ndarray, residual: np.ndarray) -> list[list[float]]:
    """After the second counting pass: the exact float32 values, per model and position."""
    values: list[list[float]] = []
    for i, positions in enumerate(plan.positions):
        row = []
        for j in range(len(positions)):
            lo, _ = bin_for_position(hist_lo[i, j], int(residual[i, j]))
            row.append(key_to_float((int(prefixes[i, j]) << 16) | lo))
        values.append(row)
    return values


def bin_bounds(prefix: int) -> tuple[float, float]:
    """Float range [lo, hi) covered by one top-16-bit bin of keys (hi = +inf for the last)."""
    lo = key_to_float(prefix << 16)
    hi = float("inf") if prefix + 1 >= HI_BINS else key_to_float((prefix + 1) << 16)
    return lo, hi


# -- DARE's counter-based generator -------------------------------------------

def dare_stream_key(seed: int, model_id: int, tensor_name: str) -> tuple[int, int]:
    """Two 32-bit words naming one (seed, model, tensor) random stream.

    blake2b of a fixed text, so the key is the same on every machine, Python
    version and process (Python's hash() is salted per process).
    """
    text = f"alloy-dare|{int(seed)}|{int(model_id)}|{tensor_name}".encode("utf-8")
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def keep_threshold(density: float) -> int:
    """Element j is kept iff hash(j) < this integer; density 1 keeps all, 0 none."""
    density = min(max(float(density), 0.0), 1.0)
    return int(round(density * 4294967296.0))


def fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser on uint64 arrays holding 32-bit values (reference use)."""
    mask = np.uint64(0xFFFFFFFF)
    x = x & mask
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x85EBCA6B)) & mask
    x ^= x >> np.uint64(13)
    x = (x * np.uint64(0xC2B2AE35)) & mask
    x ^= x >> np.uint64(16)
    return x


GOLDEN32 = 0x9E3779B9


def dare_hash(index: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """The 32-bit hash of element indices for one stream (NumPy; kernels do the same)."""
    mask = np.uint64(0xFFFFFFFF)
    j = index.astype(np.uint64)
    x = fmix32((j & mask) ^ np.uint64(k0))
    x = x ^ np.uint64(k1) ^ (((j >> np.uint64(32)) * np.uint64(GOLDEN32)) & mask)
    return fmix32(x)
