"""Exact order statistics over a stream of tensors, in two counting passes.

`RadixSelect` accumulates, per model, a histogram of the top 16 bits of the
order-preserving keys (pass 1), turns the wanted ranks into one bin each, then
accumulates the low 16 bits of the keys inside those bins (pass 2). The result
is the exact float32 value at each rank, whatever the size of the model, with
memory of a few (n, 65536) count arrays.

Also here: the rank rules of the methods (which order statistic is the
threshold), shared by both scopes so tensor and global scope differ only in
what D is.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Backend, Flat
from .keys import RankPlan, bin_bounds, resolve_hi, resolve_lo

INF = math.inf


class RadixSelect:
    """Per-model exact order statistics of values seen tensor by tensor."""

    def __init__(self, n: int, mode: int):
        self.n = n
        self.mode = mode
        self.total = 0
        self._hist_hi = np.zeros((n, 1 << 16), np.int64)
        self._hist_lo: np.ndarray | None = None
        self.plan: RankPlan | None = None
        self._prefixes: np.ndarray | None = None
        self._residual: np.ndarray | None = None

    # pass 1
    def add_hi(self, backend: Backend, flat: Flat) -> None:
        self.total += flat.m
        self._hist_hi += backend.hist_hi(flat, self.mode)

    def set_plan(self, plan: RankPlan) -> None:
        """Fix the wanted ascending positions (0-indexed) once pass 1 is done."""
        self.plan = plan
        self._prefixes, self._residual = resolve_hi(self._hist_hi, plan)
        self._hist_lo = np.zeros((self.n, self._prefixes.shape[1], 1 << 16), np.int64)

    @property
    def needs_second_pass(self) -> bool:
        return self.plan is not None and self.plan.width > 0

    def bounds(self, i: int, k: int) -> tuple[float, float]:
        """Value range [lo, hi) that pass 1 narrowed position k of model i to."""
        return bin_bounds(int(self._prefixes[i, k]))

    # pass 2
    def add_lo(self, backend: Backend, flat: Flat) -> None:
        if self.needs_second_pass:
            self._hist_lo += backend.hist_lo(flat, self.mode, self._prefixes)

    def values(self) -> list[list[float]]:
        if not self.needs_second_pass:
            return [[] for _ in range(self.n)]
        return resolve_lo(self._hist_lo, self.plan, self._prefixes, self._residual)


# -- rank rules ---------------------------------------------------------------------

KEEP_ALL = "all"
KEEP_NONE = "none"


def trim_position(total: int, density: float, rule: str) -> int | str:
    """TIES trim for D = total entries: the ascending position of the threshold, or all/none.

    official: m = int(D·k); keep |x| >= the (m+1)-th largest (the TIES code's
    kthvalue(D − m)); exact: keep |x| >= the m-th largest. Both keep every
    entry tied with the threshold. k >= 1 keeps all (the TIES code crashes
    there); k = 0 keeps nothing.
    """
    if total <= 0 or density <= 0:
        return KEEP_NONE
    m = int(total * density)
    if m >= total:
        return KEEP_ALL
    if rule == "exact":
        return KEEP_NONE if m == 0 else total - m
    return total - m - 1


def trim_plan(total: int, densities: list[float], rule: str) -> tuple[RankPlan, list[int | str]]:
    rules = [trim_position(total, d, rule) for d in densities]
    return RankPlan([[r] if isinstance(r, int) else [] for r in rules]), rules


def thresholds_from(rules: list[int | str], values: list[list[float]]) -> np.ndarray:
    """Keep-if-|x|-≥ thresholds: −inf keeps all, +inf keeps none."""
    out = np.empty(len(rules), np.float32)
    for i, r in enumerate(rules):
        out[i] = -INF if r == KEEP_ALL else INF if r == KEEP_NONE else values[i][0]
    return out


def breadcrumb_counts(length: int, density: float, outlier_frac: float) -> tuple[int, int]:
    """(n_top, n_keep) for a row of `length`: floors as in the official code, clipped to the row."""
    n_top = min(int(math.floor(outlier_frac * length)), length)
    n_keep = min(int(math.floor(density * length)), length - n_top)
    return max(n_top, 0), max(n_keep, 0)


def pcb_clip_positions(total: int, clip: float) -> tuple[int, int]:
    """Ascending positions of the clamp bounds lo, hi of |τ| (official `clamp`, int() truncation)."""
    lo = int(total * clip)
    hi = int(total * (1 - clip) - 1)
    return min(max(lo, 0), total - 1), min(max(hi, 0), total - 1)


def pcb_drop_position(total: int, ratio: float) -> int | None:
    """Ascending position of the drop quantile q (official `int(D·(1−r))`); None when r <= 0 (drop all)."""
    pos = int(total * (1 - ratio))
    if pos >= total:
        return None
    return max(pos, 0)
