"""Per-layer similarity of two models before and after permutation alignment (ALGORITHMS_DETAIL §9.6).

Models trained from different initialisations look dissimilar weight by weight
even when they compute similar functions; after weight matching the permuted
model should sit much closer to the reference. This measures, per tensor,
layer and overall, cos(θ_ref, θ_other) and ‖θ_ref − θ_other‖ before and after,
on the same (exact or sampled) positions of every tensor.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..errors import AlloyError
from ..progress import CancelToken, ProgressCallback, ProgressTracker
from .grouping import layer_groups
from .interference import _check_finite, model_label
from .result import AlignmentResult
from .sampling import AUTO_EXACT_MAX_PARAMS, DEFAULT_SAMPLE_SIZE, block_for, plan_sample, read_values, release_maps


def match_summary(match: Any) -> dict[str, Any]:
    """Objective before/after, rounds and the fraction of units each group moved, from a MatchResult."""
    if match is None:
        return {}
    groups = []
    for name, perm in getattr(match, "perms", {}).items():
        p = torch.as_tensor(perm).reshape(-1)
        moved = float((p != torch.arange(p.numel())).float().mean()) if p.numel() else 0.0
        groups.append({"name": str(name), "size": int(p.numel()), "moved": moved})
    objectives = list(getattr(match, "objectives", []) or [])
    return {
        "objective_before": float(objectives[0]) if objectives else None,
        "objective_after": float(objectives[-1]) if objectives else None,
        "rounds": int(getattr(match, "rounds", 0)),
        "converged": bool(getattr(match, "converged", True)),
        "groups": groups,
    }


def alignment_similarity(
    reference: Checkpoint,
    other: Checkpoint,
    aligned: Checkpoint,
    *,
    exact: bool | None = None,
    sample_size: int | None = None,
    seed: int = 0,
    block_size: int | None = None,
    match: Any = None,
    labels: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> AlignmentResult:
    """Similarity of `reference` to `other` and to `aligned` (other after permutation), tensor by tensor.

    Compares the floating-point tensors the three share with equal shapes.
    `match` (a `MatchResult`) adds the objective and the moved fraction per
    permutation group. Progress stage "analyze"; `cancel` raises MergeCancelled.
    """
    names = []
    for name in reference.names():
        info = reference.info(name)
        if not info.is_float or info.numel == 0:
            continue
        if all(name in ck and ck.info(name).shape == info.shape and ck.info(name).is_float for ck in (other, aligned)):
            names.append(name)
    if not names:
        raise AlloyError(f"{reference.path} and {other.path} share no floating-point tensor of the same shape")
    numels = [reference.info(n).numel for n in names]
    if exact is None:
        exact = sample_size is None and sum(numels) <= AUTO_EXACT_MAX_PARAMS
    size = None if exact else int(sample_size or DEFAULT_SAMPLE_SIZE)
    samples = [plan_sample(n, ne, size, block=block_for(reference.info(n).shape, block_size), seed=seed) for n, ne in zip(names, numels)]
    layer_labels, layer_of = layer_groups(names)
    T = len(names)
    sums = {k: np.zeros(T) for k in ("reference_sq", "other_sq", "aligned_sq", "dot_before", "dot_after")}
    tracker = ProgressTracker("analyze", T, sum(3 * 4 * s.size for s in samples), progress, cancel)
    try:
        _accumulate(reference, other, aligned, names, samples, sums, tracker, cancel)
    finally:
        release_maps()
    ref_label, other_label = labels if labels is not None else (model_label(reference), model_label(other))
    return AlignmentResult(
        reference_label=ref_label,
        other_label=other_label,
        tensor_names=names,
        tensor_layer=np.asarray(layer_of, dtype=np.int64),
        layer_labels=layer_labels,
        numel=np.asarray(numels, dtype=np.int64),
        analysed=np.asarray([s.size for s in samples], dtype=np.int64),
        sampled=size is not None,
        sample_size=size,
        seed=seed,
        match=match_summary(match),
        **sums,
    )


def _accumulate(reference: Checkpoint, other: Checkpoint, aligned: Checkpoint, names: list[str], samples: list,
                sums: dict[str, np.ndarray], tracker: ProgressTracker, cancel: CancelToken | None) -> None:
    for t, (name, sample) in enumerate(zip(names, samples)):
        if cancel is not None:
            cancel.raise_if_cancelled()
        values = []
        for ck in (reference, other, aligned):
            v = read_values(ck, name, sample)
            _check_finite(v, ck, name)
            values.append(v.to(torch.float64))
        a, b, c = values
        w = sample.weight
        sums["reference_sq"][t] = w * float(a @ a)
        sums["other_sq"][t] = w * float(b @ b)
        sums["aligned_sq"][t] = w * float(c @ c)
        sums["dot_before"][t] = w * float(a @ b)
        sums["dot_after"][t] = w * float(a @ c)
        tracker.step(3 * 4 * sample.size, f"alignment: {name}")
