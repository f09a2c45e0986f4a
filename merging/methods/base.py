"""The contract between the executor and a merge method.

A method is a pure function of one tensor's inputs (`TensorJob`) and returns the
merged tensor. It does no I/O. Methods whose statistics span the whole model
(global scope) get a `prepare` hook that may stream over every tensor first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a method: name, default, bounds and a tooltip."""

    name: str
    default: Any
    kind: type = float
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    per_model: bool = False  # may also be set under a model's `parameters`
    aliases: tuple[str, ...] = ()

    def coerce(self, value: Any) -> Any:
        """Check and convert one value; ValueError says what is wrong."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError(f"must be true or false, not {value!r}")
        if self.kind is str:
            if not isinstance(value, str):
                raise ValueError(f"must be a string, not {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}, not '{value}'")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"must be a number, not {value!r}")
            if self.kind is int and float(value) != int(value):
                raise ValueError(f"must be a whole number, not {value!r}")
            value = self.kind(value)
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"must be >= {self.minimum}, not {value}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"must be <= {self.maximum}, not {value}")
            return value
        return value


@dataclass
class TensorJob:
    """Everything a method sees for one tensor.

    `models` holds the fine-tuned tensors θ_i stacked on dim 0 (float32 or the
    recipe's compute dtype, on the compute device); `base` is θ_0 (None for
    methods that need no base). `params` holds the method's parameters resolved
    for this tensor: per-model parameters are lists of length n.
    """

    name: str
    base: torch.Tensor | None
    models: torch.Tensor
    weights: torch.Tensor
    params: dict[str, Any]
    seed: int = 0
    backend: Any = None
    stats: Any = None
    model_ids: Sequence[int] = field(default_factory=tuple)
    _tv_done: bool = field(default=False, repr=False)

    @property
    def n(self) -> int:
        return int(self.models.shape[0])

    def task_vectors(self) -> torch.Tensor:
        """τ_i = θ_i − θ_0, stacked.

        Computed in place in the `models` buffer (which the executor allocated
        for this job alone), so a merge holds n tensors, not 2n: after the first
        call `models` holds task vectors too.
        """
        if self.base is None:
            raise ValueError("this method needs a base model")
        if not self._tv_done:
            self.models.sub_(self.base.unsqueeze(0))
            self._tv_done = True
        return self.models

    def per_model(self, name: str) -> torch.Tensor:
        """A parameter as a length-n float tensor (scalars broadcast)."""
        value = self.params[name]
        if isinstance(value, (list, tuple)):
            return torch.tensor([float(v) for v in value], dtype=self.models.dtype, device=self.models.device)
        return torch.full((self.n,), float(value), dtype=self.models.dtype, device=self.models.device)


JobStream = Callable[[], Iterator[TensorJob]]


class MergeMethod:
    """Subclass per method; register with `merging.methods.registry.register`."""

    name: str = ""
    title: str = ""
    summary: str = ""
    needs_base: bool = True
    params: tuple[Param, ...] = ()

    def prepare(self, params: dict[str, Any], stream: JobStream) -> Any:
        """Whole-model statistics before the merge pass (global scope).

        `stream()` yields every mergeable tensor's job once per call, reading the
        inputs again; call it as many times as the statistic needs. Returns the
        object that the merge pass then finds in `job.stats`. Default: nothing.
        """
        return None

    def needs_prepare(self, params: dict[str, Any]) -> bool:
        return False

    def merge(self, job: TensorJob) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name or name in p.aliases:
                return p
        raise KeyError(name)
