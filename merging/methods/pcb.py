"""PCB-merging (Du et al., 2024), the official `PCB_merge` ("root" variant; ALGORITHMS_DETAIL §7.2).

Per model i, over its "row" (under `scope: global`, the official choice, the
row is the model's whole flattened task vector, all tensors together, length
D; under `scope: tensor` it is the tensor):

1. a = |τᵢ| clamped to [lo, hi], lo/hi = the ascending order statistics at
   int(D·c) and int(D·(1−c)−1) (c = `clip_ratio`); τ̃ = sign(τ)·a.
2. intra = exp(n · ((a − lo)/(hi − lo))²)   (0 inside the square when hi = lo)
3. inter = tanh(τᵢ · Σⱼ τⱼ)   (raw task vectors)
4. s = intra · inter; q = the ascending order statistic of s at int(D·(1−r))
   (r = `pcb_ratio`); w = (max(s, q) − q) / (max s − q), 0 when max s = q.
5. Δ = Σᵢ λᵢ wᵢ τ̃ᵢ / max(Σᵢ wᵢ, 1e-12) with λᵢ the per-model `weight`;
   θ = θ₀ + λ Δ.

Streaming passes under `scope: global`: 1–2) count |τ| keys for lo and hi
(two exact order statistics per model); 3–4) compute the scores tensor by
tensor, count their keys and track max s, for the exact q. So 4 passes, then
the merge pass recomputes the scores. `scope: tensor` reads each tensor once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..kernels.base import MODE_ABS_DELTA, MODE_RAW, Backend, Flat
from ..kernels.inputs import backend_of, check_same, flat_of, global_jobs, param_value, require_stats
from ..kernels.keys import RankPlan
from ..kernels.select import RadixSelect, pcb_clip_positions, pcb_drop_position
from .base import MergeMethod, Param, TensorJob
from .registry import register
from .ties import scope_param, weights_of

_WHY = "scope: global takes its quantiles over the whole model (use scope: tensor for per-tensor values)"


@dataclass
class PcbStats:
    lo: np.ndarray
    hi: np.ndarray
    q: np.ndarray
    smax: np.ndarray
    total: int
    ratio: float
    clip: float
    passes: int = 4


def _drop_cut(total: int, ratio: float, n: int) -> int | None:
    return pcb_drop_position(total, ratio) if total else None


@register
class Pcb(MergeMethod):
    name = "pcb"
    title = "PCB-merging"
    summary = "Weights every parameter of every task vector by its importance within the task and its agreement across tasks, keeping the top fraction."
    params = (
        Param(
            "weight", 1.0, float,
            "This model's λᵢ inside the weighted average (the code's per-task λ; its evolutionary search tunes these).",
            per_model=True,
        ),
        Param(
            "pcb_ratio", 0.1, float,
            "Fraction of each task vector's parameters kept by score (r). The code's defaults are 0.1; its vision runs use 0.05.",
            minimum=0.0, maximum=1.0,
        ),
        Param("lambda", 1.0, float, "Scale λ of the merged task vector; the code sweeps 0.8–2.0 (1.2 in its vision runs).",
              aliases=("scale", "scaling_coef")),
        Param(
            "clip_ratio", 1e-4, float,
            "Magnitudes are clamped to their own [c, 1 − c] quantiles before scoring (1e-4 in pcb-merging.py, 1e-2 in the NLP/vision code).",
            minimum=0.0, maximum=0.5,
        ),
        scope_param("global"),
    )

    def needs_prepare(self, params: dict[str, Any]) -> bool:
        return param_value(params, self, "scope") == "global"

    def _settings(self, params: dict[str, Any]) -> tuple[float, float]:
        return float(param_value(params, self, "pcb_ratio")), float(param_value(params, self, "clip_ratio"))

    # -- global scope ---------------------------------------------------------------------
    def prepare(self, params: dict[str, Any], stream) -> PcbStats | None:
        ratio = clip = None
        magnitudes = None
        first = ""
        for job in global_jobs(stream, self):
            r, c = self._settings(job.params)
            if magnitudes is None:
                ratio, clip, first = r, c, job.name
                magnitudes = RadixSelect(job.n, MODE_ABS_DELTA)
            check_same(job, "pcb_ratio", r, ratio, _WHY, first)
            check_same(job, "clip_ratio", c, clip, _WHY, first)
            be = backend_of(job)
            magnitudes.add_hi(be, flat_of(job, be, None))
        if magnitudes is None:
            return None
        n, total = magnitudes.n, magnitudes.total
        magnitudes.set_plan(RankPlan([list(pcb_clip_positions(total, clip))] * n))
        for job in global_jobs(stream, self):
            be = backend_of(job)
            magnitudes.add_lo(be, flat_of(job, be, None))
        bounds = magnitudes.values()
        lo = np.array([b[0] for b in bounds], np.float32)
        hi = np.array([b[1] for b in bounds], np.float32)
        scores = RadixSelect(n, MODE_RAW)
        smax = np.full(n, -np.inf, np.float32)
        for job in global_jobs(stream, self):
            be = backend_of(job)
            s = be.pcb_scores(flat_of(job, be, None), lo, hi)
            scores.add_hi(be, s)
            smax = np.maximum(smax, be.row_max(s))
        cut = _drop_cut(total, ratio, n)
        if cut is None:
            return PcbStats(lo, hi, smax.copy(), smax, total, ratio, clip, passes=3)
        scores.set_plan(RankPlan([[cut]] * n))
        for job in global_jobs(stream, self):
            be = backend_of(job)
            scores.add_lo(be, be.pcb_scores(flat_of(job, be, None), lo, hi))
        q = np.array([v[0] for v in scores.values()], np.float32)
        return PcbStats(lo, hi, q, smax, total, ratio, clip)

    # -- the merge pass ----------------------------------------------------------------------
    def merge(self, job: TensorJob) -> torch.Tensor:
        backend = backend_of(job)
        flat = flat_of(job, backend, None)
        lamw = weights_of(job, self)
        lam = float(param_value(job.params, self, "lambda"))
        ratio, clip = self._settings(job.params)
        if flat.m == 0:
            return job.base.to(torch.float32).clone()
        if param_value(job.params, self, "scope") == "global":
            stats: PcbStats = require_stats(job, self.name)
            check_same(job, "pcb_ratio", ratio, stats.ratio, _WHY, "the whole-model pass")
            check_same(job, "clip_ratio", clip, stats.clip, _WHY, "the whole-model pass")
            scores = backend.pcb_scores(flat, stats.lo, stats.hi)
            out = backend.pcb_merge(flat, scores, stats.lo, stats.hi, stats.q, stats.smax, lamw, lam)
            return backend.result(out, job.base)
        lo, hi, scores, q, smax = self._tensor_stats(backend, flat, ratio, clip)
        return backend.result(backend.pcb_merge(flat, scores, lo, hi, q, smax, lamw, lam), job.base)

    @staticmethod
    def _tensor_stats(backend: Backend, flat: Flat, ratio: float, clip: float):
        n, m = flat.n, flat.m
        bounds = backend.order_stats(flat, MODE_ABS_DELTA, RankPlan([list(pcb_clip_positions(m, clip))] * n))
        lo = np.array([b[0] for b in bounds], np.float32)
        hi = np.array([b[1] for b in bounds], np.float32)
        scores = backend.pcb_scores(flat, lo, hi)
        smax = np.asarray(backend.row_max(scores), np.float32)
        cut = _drop_cut(m, ratio, n)
        if cut is None:
            return lo, hi, scores, smax.copy(), smax
        q = np.array([v[0] for v in backend.order_stats(scores, MODE_RAW, RankPlan([[cut]] * n))], np.float32)
        return lo, hi, scores, q, smax
