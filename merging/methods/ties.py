"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint mean (ALGORITHMS_DETAIL §4).

Trim rule (the default, `trim_rule: official`, as the TIES code): with
m = int(D·density), keep every entry with |wᵢτᵢ| >= the (m+1)-th largest
magnitude, so m+1 entries when magnitudes are distinct and every entry tied
with the threshold as well. `trim_rule: exact` keeps |x| >= the m-th largest
(m entries plus ties). density >= 1 keeps all; density 0 keeps nothing.

Elect: γ = sign(Σᵢ τ̂ᵢ); where that sum is 0 the majority sign sign(Σ_p γ_p)
over the scope (the whole model under `scope: global`) is used, and where the
majority is 0 too the negative entries are selected (as the TIES code does).
Merge the agreeing non-zero entries: `mean` divides by Σ|wᵢ| of the agreeing
models with `normalize: true` (the count when weights are 1), by their count
otherwise; `sum` and `max` are the code's dis-sum and dis-max.

Streaming passes under `scope: global` (before the merge pass): 1) count the
top 16 bits of every model's |wᵢτᵢ| keys; 2) count the low 16 bits inside the
threshold bin, which gives the exact thresholds, and at the same time sum the
elected signs of the parameters the bin bounds already decide; 3) only when
those bounds cannot decide the majority sign, one more pass sums the signs
exactly. So 2 passes (3 in rare near-balanced models; 1 when every density
is 0 or 1, which needs no threshold), then the merge. The statistics take a few
(n, 65536) count arrays, whatever the size of the model. `scope: tensor` reads
each tensor once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..kernels.base import MERGE_MAX, MERGE_MEAN, MERGE_SUM, MODE_ABS_DELTA, PROVISIONAL, Backend, Flat
from ..kernels.inputs import backend_of, check_same, flat_of, global_jobs, param_value, per_model, require_stats
from ..kernels.select import KEEP_ALL, KEEP_NONE, RadixSelect, thresholds_from, trim_plan
from .base import MergeMethod, Param, TensorJob
from .registry import register

MERGE_CODES = {"mean": MERGE_MEAN, "sum": MERGE_SUM, "max": MERGE_MAX}
_WHY = "scope: global takes one top-k over the whole model (use scope: tensor for per-tensor values)"

WEIGHT = Param(
    "weight", 1.0, float,
    "Scale of this model's task vector before trimming and voting; a negative weight removes the skill.",
    per_model=True,
)
LAMBDA = Param(
    "lambda", 1.0, float,
    "Scale λ of the merged task vector added to the base. TIES' notebook uses 1.0; its README searches 0.8–2.5.",
    aliases=("scale", "scaling_coef"),
)
NORMALIZE = Param(
    "normalize", True, bool,
    "Disjoint mean: divide by the summed |weight| of the models that agree with the elected sign "
    "(with equal weights, their count). Off: divide by their count.",
)
MERGE = Param(
    "merge", "mean", str,
    "How the agreeing entries combine: mean (the paper), sum (FusionBench's default; mergekit with normalize off) "
    "or max (largest magnitude, with the elected sign).",
    choices=("mean", "sum", "max"),
)
TRIM_RULE = Param(
    "trim_rule", "official", str,
    "official keeps int(density·D)+1 entries per model, as the TIES code does; exact keeps int(density·D). "
    "Entries tied with the threshold are always kept.",
    choices=("official", "exact"),
)


def scope_param(default: str, extra: tuple[str, ...] = ()) -> Param:
    return Param(
        "scope", default, str,
        "Where the top-k by magnitude is taken: global = over each model's whole task vector (the papers' code; "
        "one or more extra reading passes before the merge), tensor = within each tensor (mergekit)"
        + (", row = along the last axis of each tensor (Breadcrumbs' code)" if "row" in extra else "") + ".",
        choices=(*extra, "tensor", "global"),
    )


def weights_of(job: TensorJob, method: MergeMethod) -> list[float]:
    """Per-model weights for this tensor: the resolved `weight` parameter, else the job's weights."""
    if "weight" in job.params:
        return per_model(job.params, method, "weight", job.n)
    w = getattr(job, "weights", None)
    if isinstance(w, torch.Tensor) and w.numel() == job.n:
        return [float(v) for v in w.reshape(-1).tolist()]
    return [1.0] * job.n


@dataclass
class TiesStats:
    """Whole-model statistics for the merge pass under `scope: global`."""

    thresholds: np.ndarray  # (n,) keep |wτ| >= thresholds[i]
    majority: int  # sign(Σ_p γ_p) over the whole model
    total: int  # D, entries per model
    densities: list[float]
    rule: str
    passes: int  # streaming passes prepare used


class TiesFamily(MergeMethod):
    """TIES steps 1–4 on whatever `task_flat` returns (plain task vectors here, DARE'd ones in dare_ties)."""

    density_param = "density"

    def task_flat(self, job: TensorJob, backend: Backend) -> Flat:
        return self.task_flat_and_base(job, backend)[0]

    def task_flat_and_base(self, job: TensorJob, backend: Backend) -> tuple[Flat, Any]:
        """The Flat TIES runs on, and the base to add afterwards when that Flat's own base is zero."""
        return flat_of(job, backend, weights_of(job, self)), None

    def trim_densities(self, params: dict[str, Any], n: int) -> list[float]:
        return per_model(params, self, self.density_param, n)

    def needs_prepare(self, params: dict[str, Any]) -> bool:
        return param_value(params, self, "scope") == "global"

    # -- global scope -------------------------------------------------------------
    def prepare(self, params: dict[str, Any], stream) -> TiesStats | None:
        rule = param_value(params, self, "trim_rule")
        densities: list[float] | None = None
        first = ""

        def checked(job: TensorJob) -> list[float]:
            nonlocal densities, first
            d = self.trim_densities(job.params, job.n)
            if densities is None:
                densities, first = d, job.name
            check_same(job, self.density_param, d, densities, _WHY, first)
            check_same(job, "trim_rule", param_value(job.params, self, "trim_rule"), rule, _WHY, first)
            return d

        passes = 0
        selector: RadixSelect | None = None
        total = 0
        # pass 1: counts of the top key bits (skipped when every density keeps all or nothing)
        jobs = global_jobs(stream, self)
        head = next(jobs, None)
        if head is None:
            return None
        if not all(d >= 1 or d <= 0 for d in checked(head)):
            selector = RadixSelect(head.n, MODE_ABS_DELTA)
            for job in _chain(head, jobs):
                checked(job)
                be = backend_of(job)
                selector.add_hi(be, self.task_flat(job, be))
            total = selector.total
            passes += 1
        plan, rules = trim_plan(max(total, 1), densities, rule)
        n = len(densities)
        # pass 2: exact thresholds, and the signs the bin bounds already decide
        lo = np.empty(n, np.float32)
        hi = np.empty(n, np.float32)
        if selector is not None:
            selector.set_plan(plan)
        for i, r in enumerate(rules):
            if r == KEEP_ALL:
                lo[i] = hi[i] = -np.inf
            elif r == KEEP_NONE:
                lo[i] = hi[i] = np.inf
            else:
                lo[i], hi[i] = selector.bounds(i, 0)
        certain = undecided = 0
        for job in global_jobs(stream, self):
            be = backend_of(job)
            flat = self.task_flat(job, be)
            if selector is not None:
                selector.add_lo(be, flat)
            else:
                checked(job)
                total += flat.m
            c, u = be.ties_sign(flat, lo, hi)
            certain += c
            undecided += u
        passes += 1
        thresholds = thresholds_from(rules, selector.values() if selector is not None else [[]] * n)
        # pass 3, rarely: the exact majority sign
        if abs(certain) <= undecided and undecided > 0:
            certain = 0
            for job in global_jobs(stream, self):
                be = backend_of(job)
                c, _ = be.ties_sign(self.task_flat(job, be), thresholds, thresholds)
                certain += c
            passes += 1
        majority = int(np.sign(certain))
        return TiesStats(thresholds, majority, total, densities, rule, passes)

    # -- the merge pass -------------------------------------------------------------
    def merge(self, job: TensorJob) -> torch.Tensor:
        backend = backend_of(job)
        flat, offset = self.task_flat_and_base(job, backend)
        lam = float(param_value(job.params, self, "lambda"))
        merge = MERGE_CODES[param_value(job.params, self, "merge")]
        weighted = bool(param_value(job.params, self, "normalize"))
        densities = self.trim_densities(job.params, job.n)
        if param_value(job.params, self, "scope") == "global":
            stats: TiesStats = require_stats(job, self.name)
            check_same(job, self.density_param, densities, stats.densities, _WHY, "the whole-model pass")
            out, _, _ = backend.ties_merge(flat, stats.thresholds, lam, merge, weighted, stats.majority)
            return backend.result(out if offset is None else out + offset, job.base)
        rule = param_value(job.params, self, "trim_rule")
        plan, rules = trim_plan(flat.m, densities, rule)
        thr = thresholds_from(rules, backend.order_stats(flat, MODE_ABS_DELTA, plan))
        out, gsum, fallback = backend.ties_merge(flat, thr, lam, merge, weighted, PROVISIONAL)
        if fallback:
            out = backend.ties_fixup(flat, thr, lam, merge, weighted, int(np.sign(gsum)), out)
        return backend.result(out if offset is None else out + offset, job.base)


def _chain(first, rest):
    yield first
    yield from rest


@register
class Ties(TiesFamily):
    name = "ties"
    title = "TIES"
    summary = "Trims each task vector to its largest entries, elects a sign per parameter, and averages the agreeing entries."
    params = (
        WEIGHT,
        Param(
            "density", 0.2, float,
            "Fraction of each task vector's entries kept, by magnitude (TIES' k). 0.2 keeps the top 20 %; 1 keeps all.",
            minimum=0.0, maximum=1.0, per_model=True,
        ),
        LAMBDA,
        NORMALIZE,
        scope_param("global"),
        MERGE,
        TRIM_RULE,
    )
