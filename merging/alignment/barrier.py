"""Interpolation paths and the loss barrier, naive vs aligned (ALGORITHMS_DETAIL.md §8.7).

Path: `θ(α) = (1 − α)·θ_A + α·θ_B` over float tensors. Two barrier figures are
reported for each curve:
- `barrier` (the official Git Re-Basin plots): `max_α L(θ(α)) − ½(L_A + L_B)`;
- `barrier_linear` (Entezari et al., and ALGORITHMS.md): `max_α [L(θ(α)) − ((1 − α)L_A + α L_B)]`.
They agree when the endpoint losses are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

DEFAULT_ALPHAS = tuple(i / 24 for i in range(25))  # the official grid, linspace(0, 1, 25)

#: An evaluation: parameters -> loss, or a mapping with a "loss" key plus other metrics (e.g. "accuracy").
EvalFn = Callable[[dict[str, torch.Tensor]], "float | Mapping[str, float]"]


def interpolate(params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """`(1 − α)·A + α·B` for float tensors (computed in at least float32, stored in A's dtype); others from A."""
    out: dict[str, torch.Tensor] = {}
    for name, a in params_a.items():
        if name not in params_b:
            raise KeyError(f"tensor '{name}' is missing from the second model")
        if not a.dtype.is_floating_point:
            out[name] = a
            continue
        work = torch.promote_types(a.dtype, torch.float32)
        out[name] = torch.lerp(a.to(work), params_b[name].to(work), float(alpha)).to(a.dtype)
    return out


@dataclass
class Curve:
    """Losses (and other metrics) along α for one path, with its barrier figures."""

    losses: list[float]
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def barrier(self) -> float:
        return max(self.losses) - 0.5 * (self.losses[0] + self.losses[-1])

    def barrier_linear(self, alphas: Sequence[float]) -> float:
        a, b = self.losses[0], self.losses[-1]
        return max(loss - ((1 - t) * a + t * b) for t, loss in zip(alphas, self.losses))


@dataclass
class BarrierResult:
    """Naive and aligned interpolation curves on one α grid."""

    alphas: list[float]
    naive: Curve
    aligned: Curve

    @property
    def naive_barrier(self) -> float:
        return self.naive.barrier()

    @property
    def aligned_barrier(self) -> float:
        return self.aligned.barrier()

    def to_dict(self) -> dict[str, Any]:
        def curve(c: Curve) -> dict[str, Any]:
            return {
                "loss": list(c.losses),
                **{k: list(v) for k, v in c.metrics.items()},
                "barrier": c.barrier(),
                "barrier_linear": c.barrier_linear(self.alphas),
            }

        return {
            "alphas": list(self.alphas),
            "barrier_definition": "max loss along the path minus the mean of the endpoint losses",
            "barrier_linear_definition": "max over alpha of loss minus the linear interpolation of the endpoint losses",
            "naive": curve(self.naive),
            "aligned": curve(self.aligned),
        }


def _evaluate(eval_fn: EvalFn, params: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    value = eval_fn(params)
    if isinstance(value, Mapping):
        if "loss" not in value:
            raise ValueError("the evaluation function returned a mapping without a 'loss' key")
        extras = {k: float(v) for k, v in value.items() if k != "loss" and isinstance(v, (int, float))}
        return float(value["loss"]), extras
    return float(value), {}


def loss_curve(eval_fn: EvalFn, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
               alphas: Sequence[float] = DEFAULT_ALPHAS) -> Curve:
    """Evaluate `eval_fn` at every α of the straight path from A to B."""
    losses: list[float] = []
    metrics: dict[str, list[float]] = {}
    for alpha in alphas:
        loss, extras = _evaluate(eval_fn, interpolate(params_a, params_b, alpha))
        losses.append(loss)
        for key, value in extras.items():
            metrics.setdefault(key, []).append(value)
    return Curve(losses, metrics)


def loss_barrier(eval_fn: EvalFn, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                 params_b_aligned: Mapping[str, torch.Tensor], alphas: Sequence[float] = DEFAULT_ALPHAS) -> BarrierResult:
    """Loss along α from A to B (naive) and from A to π(B) (aligned), with both barriers.

    `eval_fn(params)` returns a loss, or a mapping with "loss" and other numbers
    (accuracy, ...) that are recorded along the curve too. The default grid is
    the official `linspace(0, 1, 25)`.
    """
    alphas = [float(a) for a in alphas]
    if len(alphas) < 2 or alphas[0] != 0.0 or alphas[-1] != 1.0:
        raise ValueError("alphas must run from 0 to 1 (both ends included) so the barrier has its endpoints")
    naive = loss_curve(eval_fn, params_a, params_b, alphas)
    aligned = loss_curve(eval_fn, params_a, params_b_aligned, alphas)
    return BarrierResult(alphas, naive, aligned)
