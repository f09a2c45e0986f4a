"""The interface both kernel backends implement, and the logic they share.

A method flattens a tensor job into `Flat`: θ_i stacked as (n, m) float32, θ₀
as (m,), per-model weights as (n,). Every op takes a `Flat` and never changes
it. Results come back as backend-native arrays; `Backend.result` turns a merged
(m,) array into a torch tensor of the job's shape on the job's device.

Selections are exact and counted on order-preserving keys (see `keys.py`), so
the two backends pick bit-identical thresholds; element-wise maths is float32
in the same operation order in both, summing models in index order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .keys import RankPlan, resolve_hi, resolve_lo

MODE_ABS_DELTA = 0  # select on |w_i · (θ_i − θ₀)|
MODE_RAW = 1  # select on the values of `models` themselves (PCB scores)

MERGE_MEAN = 0  # TIES disjoint mean
MERGE_SUM = 1  # disjoint sum
MERGE_MAX = 2  # disjoint max magnitude, with the elected sign
PROVISIONAL = 2  # ties_merge's `majority` when the scope's majority sign is not known yet

SMALL_SELECT = 1 << 16  # below this many elements a plain partition beats two counting passes


@dataclass
class Flat:
    """One tensor's inputs as flat float32 arrays (NumPy for numba, torch for torch)."""

    models: Any  # (n, m)
    base: Any  # (m,)
    w: Any  # (n,)

    @property
    def n(self) -> int:
        return int(self.models.shape[0])

    @property
    def m(self) -> int:
        return int(self.models.shape[1])


class Backend:
    """Kernel backend: numba (CPU) or torch (CUDA or CPU). Stateless apart from its device."""

    name: str = ""
    device: torch.device = torch.device("cpu")

    # -- conversion -----------------------------------------------------------
    def flat(self, models: torch.Tensor, base: torch.Tensor | None, weights: torch.Tensor | Sequence[float] | None) -> Flat:
        raise NotImplementedError

    def result(self, out: Any, like: torch.Tensor) -> torch.Tensor:
        """(m,) merged values -> float32 tensor with `like`'s shape and device."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        raise NotImplementedError

    # -- counting passes (radix select) ---------------------------------------
    def hist_hi(self, flat: Flat, mode: int) -> np.ndarray:
        """(n, 65536) int64 counts of the top 16 key bits per model."""
        raise NotImplementedError

    def hist_lo(self, flat: Flat, mode: int, prefixes: np.ndarray) -> np.ndarray:
        """(n, K, 65536) int64 counts of the low 16 key bits among keys whose top bits equal prefixes[i, k]."""
        raise NotImplementedError

    def partition_stats(self, flat: Flat, mode: int, plan: RankPlan) -> list[list[float]]:
        """Order statistics by an in-memory partition (small tensors)."""
        raise NotImplementedError

    def order_stats(self, flat: Flat, mode: int, plan: RankPlan) -> list[list[float]]:
        """Exact order statistics per model: `plan.positions[i]` are 0-indexed ascending positions."""
        if plan.width == 0:
            return [[] for _ in range(plan.n)]
        if flat.m <= SMALL_SELECT:
            return self.partition_stats(flat, mode, plan)
        hist = self.hist_hi(flat, mode)
        prefixes, residual = resolve_hi(hist, plan)
        return resolve_lo(self.hist_lo(flat, mode, prefixes), plan, prefixes, residual)

    # -- TIES -------------------------------------------------------------------
    def ties_sign(self, flat: Flat, lo_thr: np.ndarray, hi_thr: np.ndarray) -> tuple[int, int]:
        """Σ_p sign(Σ_i τ̂_ip) over parameters decided by the bounds, and the count left undecided.

        An entry is surely kept if |t| >= hi_thr[i], surely dropped if |t| < lo_thr[i];
        a parameter with a non-zero entry in between is undecided. lo == hi gives the exact sum.
        """
        raise NotImplementedError

    def ties_merge(self, flat: Flat, thr: np.ndarray, lam: float, merge: int, weighted: bool, majority: int) -> tuple[Any, int, int]:
        """θ₀ + λ · disjoint merge of the entries with |t| >= thr[i].

        Returns (merged, Σ_p γ_p, number of parameters whose elected sign fell back to `majority`).
        `majority` = PROVISIONAL leaves NaN at those parameters, for `ties_fixup` once Σ_p γ_p is known.
        """
        raise NotImplementedError

    def ties_fixup(self, flat: Flat, thr: np.ndarray, lam: float, merge: int, weighted: bool, majority: int, out: Any) -> Any:
        """Fill the NaN a PROVISIONAL ties_merge left, with the now known majority sign."""
        raise NotImplementedError

    # -- DARE -------------------------------------------------------------------
    def dare(self, flat: Flat, k0: np.ndarray, k1: np.ndarray, keep_below: np.ndarray, scale: np.ndarray) -> Flat:
        """DARE'd task vectors mask·(θ_i − θ₀)·scale_i as a Flat with zero base and the same weights."""
        raise NotImplementedError

    def sum_merge(self, tau: Flat, base: Any, lam: float) -> Any:
        """base + λ Σ_i w_i · tau.models[i], summed in model order."""
        raise NotImplementedError

    # -- Breadcrumbs -----------------------------------------------------------
    def row_bounds(self, flat: Flat, row_len: int, n_top: Sequence[int], n_keep: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per model i and row of length row_len: the n_top[i]-th and (n_top[i]+n_keep[i])-th largest |t|.

        Each is +inf where its count is 0; n_top + n_keep <= row_len.
        """
        raise NotImplementedError

    def band_merge(self, flat: Flat, row_len: int, t_top: np.ndarray, t_keep: np.ndarray, lam: float) -> Any:
        """θ₀ + λ Σ_i t_i · [t_keep ≤ |t_i| < t_top] with thresholds per (model, row)."""
        raise NotImplementedError

    # -- PCB --------------------------------------------------------------------
    def pcb_scores(self, flat: Flat, lo: np.ndarray, hi: np.ndarray) -> Flat:
        """Scores s_i = exp(n·mm(a_i)²)·tanh(τ_i·Σ_j τ_j) as a Flat (scores in `models`)."""
        raise NotImplementedError

    def row_max(self, scores: Flat) -> np.ndarray:
        raise NotImplementedError

    def pcb_merge(self, flat: Flat, scores: Flat, lo: np.ndarray, hi: np.ndarray, q: np.ndarray, smax: np.ndarray, lamw: np.ndarray, lam: float) -> Any:
        """θ₀ + λ Σ_i λ_i w_i τ̃_i / max(Σ_i w_i, 1e-12), w_i = (max(s_i, q_i) − q_i)/(smax_i − q_i)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device}>"


def as_f32(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32))
