"""Model Breadcrumbs (Davari & Belilovsky, 2024): drop the largest and the smallest entries (ALGORITHMS_DETAIL §6).

For every row (official: along the last axis of each tensor; a 1-D tensor is
one row; a 0-d tensor keeps its whole task vector) of length L, with
n_top = floor(outlier_frac·L) and n_keep = floor(density·L): entries with
|wᵢτᵢ| >= the n_top-th largest are outliers and dropped, entries with
|wᵢτᵢ| >= the (n_top+n_keep)-th largest that are not outliers are kept, the
rest is dropped. Then θ₀ + λ Σ (kept wᵢτᵢ). With distinct magnitudes this is
exactly the official code; on ties at a cut the tied entries all go the same
way (outlier at the top cut, kept at the bottom one) instead of an arbitrary
`topk` order, so every backend agrees.

`scope: tensor` uses each whole tensor as one row (mergekit's granularity,
without its bug of zeroing a tensor when n_top is 0); `scope: global` uses each
model's whole task vector, which costs 2 streaming passes before the merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..kernels.base import MODE_ABS_DELTA, Backend, Flat
from ..kernels.inputs import backend_of, check_same, flat_of, global_jobs, param_value, per_model, require_stats
from ..kernels.keys import RankPlan
from ..kernels.select import RadixSelect, breadcrumb_counts
from .base import MergeMethod, Param, TensorJob
from .registry import register
from .ties import WEIGHT, scope_param, weights_of

_WHY = "scope: global takes one cut over the whole model (use scope: row or tensor for per-tensor values)"


@dataclass
class BreadcrumbStats:
    t_top: np.ndarray  # (n,) outlier cut: |wτ| >= t_top is dropped
    t_keep: np.ndarray  # (n,) lower cut: |wτ| >= t_keep is kept (unless an outlier)
    total: int
    densities: list[float]
    outliers: list[float]
    passes: int = 2


def _cut_plan(length: int, densities: list[float], outliers: list[float]) -> tuple[RankPlan, list[tuple[int, int]]]:
    """Ascending positions of the two cuts per model for a row of `length` entries."""
    counts = [breadcrumb_counts(length, d, g) for d, g in zip(densities, outliers)]
    positions = []
    for top, keep in counts:
        pos = []
        if top > 0:
            pos.append(length - top)
        if keep > 0:
            pos.append(length - top - keep)
        positions.append(pos)
    return RankPlan(positions), counts


def _cuts_from(values: list[list[float]], counts: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    n = len(counts)
    t_top = np.full(n, np.inf, np.float32)
    t_keep = np.full(n, np.inf, np.float32)
    for i, (top, keep) in enumerate(counts):
        k = 0
        if top > 0:
            t_top[i] = values[i][k]
            k += 1
        if keep > 0:
            t_keep[i] = values[i][k]
    return t_top, t_keep


@register
class Breadcrumbs(MergeMethod):
    name = "breadcrumbs"
    title = "Model Breadcrumbs"
    summary = "Drops each task vector's few largest outliers and its many small entries, then adds the rest (task arithmetic)."
    params = (
        WEIGHT,
        Param(
            "density", 0.15, float,
            "Fraction of each row's entries kept just below the outliers (the official β = top_k_keep). 0.15 from the official search's start.",
            minimum=0.0, maximum=1.0, per_model=True,
        ),
        Param(
            "outlier_frac", 0.006, float,
            "Fraction of each row's largest-magnitude entries dropped as outliers (the official γ = top_k_remove; mergekit's gamma).",
            minimum=0.0, maximum=1.0, per_model=True, aliases=("gamma",),
        ),
        Param("lambda", 0.2, float, "Scale λ of the summed masked task vectors (α in the paper; 0.2 is the official search's start).",
              aliases=("scale", "scaling_coef")),
        Param("normalize", False, bool, "Divide the sum by the sum of the weights."),
        scope_param("row", extra=("row",)),
    )

    def needs_prepare(self, params: dict[str, Any]) -> bool:
        return param_value(params, self, "scope") == "global"

    def _fractions(self, params: dict[str, Any], n: int) -> tuple[list[float], list[float]]:
        return per_model(params, self, "density", n), per_model(params, self, "outlier_frac", n)

    def prepare(self, params: dict[str, Any], stream) -> BreadcrumbStats | None:
        selector = None
        densities = outliers = None
        first = ""
        for job in global_jobs(stream, self):
            d, g = self._fractions(job.params, job.n)
            if selector is None:
                selector = RadixSelect(job.n, MODE_ABS_DELTA)
                densities, outliers, first = d, g, job.name
            check_same(job, "density", d, densities, _WHY, first)
            check_same(job, "outlier_frac", g, outliers, _WHY, first)
            be = backend_of(job)
            selector.add_hi(be, flat_of(job, be, weights_of(job, self)))
        if selector is None:
            return None
        plan, counts = _cut_plan(selector.total, densities, outliers)
        selector.set_plan(plan)
        if selector.needs_second_pass:
            for job in global_jobs(stream, self):
                be = backend_of(job)
                selector.add_lo(be, flat_of(job, be, weights_of(job, self)))
        t_top, t_keep = _cuts_from(selector.values(), counts)
        return BreadcrumbStats(t_top, t_keep, selector.total, densities, outliers)

    def merge(self, job: TensorJob) -> torch.Tensor:
        backend = backend_of(job)
        weights = weights_of(job, self)
        flat = flat_of(job, backend, weights)
        lam = float(param_value(job.params, self, "lambda"))
        if param_value(job.params, self, "normalize"):
            total = sum(weights)
            if total == 0:
                raise ValueError("the model weights sum to zero; cannot normalize")
            lam /= total
        densities, outliers = self._fractions(job.params, job.n)
        scope = param_value(job.params, self, "scope")
        t_top, t_keep, row_len = self._cuts(job, backend, flat, scope, densities, outliers)
        return backend.result(backend.band_merge(flat, row_len, t_top, t_keep, lam), job.base)

    def _cuts(self, job: TensorJob, backend: Backend, flat: Flat, scope: str, densities, outliers):
        n, m = flat.n, flat.m
        if scope == "global":
            stats: BreadcrumbStats = require_stats(job, self.name)
            check_same(job, "density", densities, stats.densities, _WHY, "the whole-model pass")
            check_same(job, "outlier_frac", outliers, stats.outliers, _WHY, "the whole-model pass")
            return stats.t_top[:, None], stats.t_keep[:, None], max(m, 1)
        if scope == "row" and job.base.dim() == 0:
            # the official code leaves 0-d tensors' task vectors whole
            return np.full((n, 1), np.inf, np.float32), np.full((n, 1), -np.inf, np.float32), 1
        if scope == "row":
            row_len = int(job.base.shape[-1])
            if row_len == 0 or m == 0:
                return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.float32), max(row_len, 1)
            counts = [breadcrumb_counts(row_len, d, g) for d, g in zip(densities, outliers)]
            t_top, t_keep = backend.row_bounds(flat, row_len, [c[0] for c in counts], [c[1] for c in counts])
            return t_top, t_keep, row_len
        plan, counts = _cut_plan(m, densities, outliers)
        t_top, t_keep = _cuts_from(backend.order_stats(flat, MODE_ABS_DELTA, plan), counts)
        return t_top[:, None], t_keep[:, None], max(m, 1)
