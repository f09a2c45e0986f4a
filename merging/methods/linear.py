"""Linear average / model soup: θ = Σ wᵢ θᵢ / Σ wᵢ (ALGORITHMS.md §2). Needs no base."""

from __future__ import annotations

import torch

from .base import MergeMethod, Param, TensorJob
from .registry import register


@register
class Linear(MergeMethod):
    name = "linear"
    title = "Linear (model soup)"
    summary = "Weighted average of the models' weights; needs no base model."
    needs_base = False
    params = (
        Param("weight", 1.0, float, "This model's share of the average.", per_model=True),
        Param("normalize", True, bool, "Divide by the sum of the weights (an average), or not (a weighted sum)."),
    )

    def merge(self, job: TensorJob) -> torch.Tensor:
        w = job.per_model("weight")
        total = torch.tensordot(w, job.models, dims=1)
        if job.params["normalize"]:
            denom = w.sum()
            if float(denom) == 0.0:
                raise ValueError("the model weights sum to zero; cannot normalize")
            total = total / denom
        return total
