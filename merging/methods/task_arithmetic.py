"""Task arithmetic: θ = θ₀ + λ Σ wᵢ τᵢ (ALGORITHMS.md §3). Negative weights remove a skill."""

from __future__ import annotations

import torch

from .base import MergeMethod, Param, TensorJob
from .registry import register


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    title = "Task arithmetic"
    summary = "Adds the weighted sum of task vectors (fine-tune minus base) to the base."
    params = (
        Param("weight", 1.0, float, "Scale of this model's task vector; negative removes its skill.", per_model=True),
        Param("lambda", 1.0, float, "Scale of the summed task vector (λ); papers tune 0.3–1.0.", aliases=("scale", "scaling_coef")),
        Param("normalize", False, bool, "Divide the sum by the sum of the weights."),
    )

    def merge(self, job: TensorJob) -> torch.Tensor:
        w = job.per_model("weight")
        delta = torch.tensordot(w, job.task_vectors(), dims=1)  # one pass over the stacked buffer
        if job.params["normalize"]:
            denom = w.sum()
            if float(denom) == 0.0:
                raise ValueError("the model weights sum to zero; cannot normalize")
            delta = delta / denom
        return job.base + float(job.params["lambda"]) * delta
