"""DARE (Yu et al., 2024): drop each task-vector entry at random, rescale the survivors (ALGORITHMS_DETAIL §5).

τ'ᵢ = mᵢ ⊙ τᵢ / density with mᵢ ~ Bernoulli(density). The mask comes from a
counter-based generator: element j of tensor t of model i is kept iff
h(j) < round(density·2³²), where h is MurmurHash3's 32-bit finaliser applied
twice to j mixed with a 64-bit stream key blake2b("alloy-dare|seed|model|t").
So the mask is the same on every backend, thread count, tensor order and run.

- `dare_linear`: task arithmetic on τ' (MergeLM's `task_arithmetic` combiner):
  θ₀ + λ Σ wᵢ τ'ᵢ. One pass.
- `dare_ties`: DARE first, then the full TIES on τ' with its own trim density
  (MergeLM's and FusionBench's order; the default `trim_density` is 0.2).
  `trim_density: 1` gives "DARE as the sparsifier" (elect + disjoint mean
  only); add `merge: sum` for mergekit's dare_ties. Its streaming passes under
  `scope: global` are those of TIES (2, rarely 3), each recomputing the masks.
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.base import Backend, Flat
from ..kernels.inputs import backend_of, flat_of, model_ids, param_value, per_model
from ..kernels.keys import dare_stream_key, keep_threshold
from .base import MergeMethod, Param, TensorJob
from .registry import register
from .ties import LAMBDA, MERGE, NORMALIZE, TRIM_RULE, WEIGHT, TiesFamily, scope_param, weights_of

DENSITY = Param(
    "density", 0.1, float,
    "DARE keep probability: each task-vector entry survives with this probability (drop rate 1 − density). "
    "0.1 as in the paper's LLM runs; deltas larger than about 0.005 usually need more.",
    minimum=0.0, maximum=1.0, per_model=True,
)
RESCALE = Param(
    "rescale", True, bool,
    "Divide the surviving entries by the density so that the expected task vector is unchanged (DARE); off: only drop.",
)


def dare_flat(method: MergeMethod, job: TensorJob, backend: Backend, flat: Flat | None = None) -> Flat:
    """The job's task vectors after DARE's seeded drop and rescale (weights kept separate)."""
    if flat is None:
        flat = flat_of(job, backend, weights_of(job, method))
    densities = per_model(job.params, method, "density", job.n)
    rescale = bool(param_value(job.params, method, "rescale"))
    ids = model_ids(job)
    k0, k1, below, scale = [], [], [], []
    for i in range(job.n):
        a, b = dare_stream_key(job.seed, ids[i], job.name)
        k0.append(a)
        k1.append(b)
        below.append(keep_threshold(densities[i]))
        q = densities[i]
        scale.append(1.0 / q if rescale and q > 0 else 1.0)
    return backend.dare(flat, k0, k1, below, scale)


@register
class DareLinear(MergeMethod):
    name = "dare_linear"
    title = "DARE + task arithmetic"
    summary = "Randomly drops most of each task vector, rescales the rest, and adds their weighted sum to the base."
    params = (
        WEIGHT,
        DENSITY,
        Param("lambda", 1.0, float, "Scale λ of the summed task vectors (as in task arithmetic).", aliases=("scale", "scaling_coef")),
        Param("normalize", False, bool, "Divide the sum by the sum of the weights (an average of the dropped task vectors)."),
        RESCALE,
    )

    def merge(self, job: TensorJob) -> torch.Tensor:
        backend = backend_of(job)
        flat = flat_of(job, backend, weights_of(job, self))
        tau = dare_flat(self, job, backend, flat)
        lam = float(param_value(job.params, self, "lambda"))
        if param_value(job.params, self, "normalize"):
            total = sum(weights_of(job, self))
            if total == 0:
                raise ValueError("the model weights sum to zero; cannot normalize")
            lam /= total
        return backend.result(backend.sum_merge(tau, flat.base, lam), job.base)


@register
class DareTies(TiesFamily):
    name = "dare_ties"
    title = "DARE + TIES"
    summary = "Randomly drops and rescales each task vector, then trims, elects signs and averages as TIES does."
    density_param = "trim_density"
    params = (
        WEIGHT,
        DENSITY,
        Param(
            "trim_density", 0.2, float,
            "TIES' magnitude trim after DARE: fraction of entries kept per model (0.2 as in MergeLM). "
            "1 skips the trim (DARE as the only sparsifier).",
            minimum=0.0, maximum=1.0, per_model=True,
        ),
        LAMBDA,
        NORMALIZE,
        scope_param("global"),
        MERGE,
        TRIM_RULE,
        RESCALE,
    )

    def task_flat_and_base(self, job: TensorJob, backend: Backend) -> tuple[Flat, Any]:
        flat = flat_of(job, backend, weights_of(job, self))
        return dare_flat(self, job, backend, flat), flat.base
