"""From a method's TensorJob to what the kernels take: backend, flat arrays, per-model values.

Shared by the sparse methods (TIES, DARE, Breadcrumbs, PCB) so that each reads
its parameters the same way: canonical name first, then its aliases, then the
method's default.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from ..errors import RecipeError
from . import get_backend
from .base import Backend, Flat


def backend_of(job: Any) -> Backend:
    """The job's backend; a job built without one runs on the CPU default."""
    backend = getattr(job, "backend", None)
    return backend if backend is not None else get_backend("auto", "cpu")


def param_value(params: dict[str, Any], method: Any, name: str) -> Any:
    """A parameter by name or alias, else the method's default for it."""
    spec = method.param(name)
    for key in (spec.name, *spec.aliases):
        if key in params:
            return params[key]
    return spec.default


def per_model(params: dict[str, Any], method: Any, name: str, n: int) -> list[float]:
    """A per-model parameter as n floats (a scalar applies to every model)."""
    value = param_value(params, method, name)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise RecipeError(name, f"has {len(value)} values for {n} models")
        return [float(v) for v in value]
    if hasattr(value, "tolist"):
        value = value.tolist()
        if isinstance(value, list):
            return per_model({name: value}, method, name, n)
    return [float(value)] * n


def flat_of(job: Any, backend: Backend, weights: Sequence[float] | None = None) -> Flat:
    return backend.flat(job.models, job.base, weights)


def model_ids(job: Any) -> list[int]:
    ids = list(getattr(job, "model_ids", ()) or ())
    return [int(i) for i in ids] if len(ids) == job.n else list(range(job.n))


def check_same(job: Any, name: str, value: Any, expected: Any, why: str, where: str | None = None) -> None:
    """Global-scope statistics assume one value across tensors; say which tensors differ."""
    if value != expected:
        other = f"for tensor '{where}'" if where else "elsewhere"
        raise RecipeError(name, f"is {value} for tensor '{job.name}' but {expected} {other}; {why}")


def global_jobs(stream: Any, method: Any) -> Iterable[Any]:
    """The jobs of one pass whose resolved scope is global."""
    for job in stream():
        if param_value(job.params, method, "scope") == "global":
            yield job


def require_stats(job: Any, method_name: str) -> Any:
    if job.stats is None:
        raise RecipeError(
            "scope",
            f"{method_name} with scope 'global' needs the whole-model pass before merging "
            f"(tensor '{job.name}'); set scope for the whole merge, not for some tensors only",
        )
    return job.stats
