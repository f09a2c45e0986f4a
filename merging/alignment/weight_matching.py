"""Git Re-Basin weight matching: coordinate descent over permutation groups (ALGORITHMS_DETAIL.md §8.3).

Maximises Σ_k ⟨A_k, π(B)_k⟩ (the same as minimising ‖θ_A − π(θ_B)‖²) one group
at a time: with every other group fixed, the best permutation of one group is
a linear assignment problem on C = Σ a·bᵀ over the axes it permutes. Groups
are visited in a seeded random order each round until a round brings no
strict gain (or `max_rounds`). An attention group (Q/K with V/O) is one step:
the best within-head assignments for every pair of heads, then the best
assignment of heads (§8.4, "Solving attention groups").

Both models' permuted tensors are held in memory (on `device`) while matching;
only the tensors the spec names are needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import AlloyError, CheckpointError
from .apply import check_permutations, full_index
from .spec import AttentionGroup, AxisRef, PermutationSpec

#: A round counts as progress only if some step gains more than this (the official rule).
IMPROVEMENT_EPS = 1e-12

Progress = Callable[[str, int, int], None]


@dataclass
class MatchResult:
    """The permutations found and how the objective rose.

    `perms[group][i]` is the unit of B that moves to slot i.
    `objectives[0]` is Σ⟨A, π(B)⟩ before matching (or at `init`), then one value
    per round; `rounds` counts the rounds run; `converged` is False when
    `max_rounds` stopped the descent before a round without gain.
    """

    perms: dict[str, torch.Tensor]
    objectives: list[float]
    rounds: int
    converged: bool
    seed: int = 0
    spec_name: str = "custom"
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def objective(self) -> float:
        return self.objectives[-1]

    def to_dict(self, *, with_perms: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec_name,
            "seed": self.seed,
            "rounds": self.rounds,
            "converged": self.converged,
            "objectives": list(self.objectives),
            "groups": dict(self.sizes),
        }
        if with_perms:
            out["perms"] = {g: p.tolist() for g, p in self.perms.items()}
        return out


def _solve(cost: np.ndarray) -> np.ndarray:
    """Column for each row maximising the total (rows are A's units, columns B's)."""
    _, cols = linear_sum_assignment(cost, maximize=True)
    return cols


def _value(cost: np.ndarray, perm: np.ndarray) -> float:
    return float(cost[np.arange(len(perm)), perm].sum())


def _solve_attention(att: AttentionGroup, c_qk: np.ndarray, c_vo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best block-structured (perm_qk, perm_vo): head h of A gets head σ(h) of B, dims matched inside."""
    h = att.num_heads
    dq, dv = len(c_qk) // h, len(c_vo) // h
    inner_qk: dict[tuple[int, int], np.ndarray] = {}
    inner_vo: dict[tuple[int, int], np.ndarray] = {}
    score = np.full((h, h), -np.inf)

    def block_best(cost: np.ndarray, d: int, a: int, b: int, within: bool) -> tuple[np.ndarray, float]:
        block = cost[a * d:(a + 1) * d, b * d:(b + 1) * d]
        cols = _solve(block) if within else np.arange(d)
        return cols, _value(block, cols)

    for a in range(h):
        for b in range(h) if att.permute_heads else (a,):
            inner_qk[a, b], v_qk = block_best(c_qk, dq, a, b, att.within_qk)
            inner_vo[a, b], v_vo = block_best(c_vo, dv, a, b, att.within_vo)
            score[a, b] = v_qk + v_vo
    sigma = _solve(score) if att.permute_heads else np.arange(h)
    perm_qk = np.concatenate([sigma[a] * dq + inner_qk[a, sigma[a]] for a in range(h)])
    perm_vo = np.concatenate([sigma[a] * dv + inner_vo[a, sigma[a]] for a in range(h)])
    return perm_qk, perm_vo


class _Matcher:
    """The state of one matching run: both models on the device and the current permutations."""

    def __init__(self, spec: PermutationSpec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                 perms: dict[str, torch.Tensor], sizes: dict[str, int], device: torch.device):
        self.spec = spec
        self.a = a
        self.b = b
        self.sizes = sizes
        self.device = device
        self.perms = {g: p.to(device) for g, p in perms.items()}
        self.refs = spec.perm_to_axes(sizes, tensors=list(a))

    def cost(self, group: str) -> np.ndarray:
        """C[i, j] = Σ over the group's axes of ⟨A unit i, B unit j⟩, other groups applied to B."""
        n = self.sizes[group]
        total = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for ref in self.refs[group]:
            a = self.a[ref.tensor]
            b = self._permuted_b(ref)
            if ref.offset is not None:
                a = a.narrow(ref.axis, ref.offset, ref.size)
                b = b.narrow(ref.axis, ref.offset, ref.size)
            a = a.movedim(ref.axis, 0).reshape(n, -1)
            b = b.movedim(ref.axis, 0).reshape(n, -1)
            total += (a @ b.T).to(torch.float64)
        return total.cpu().numpy()

    def _permuted_b(self, ref: AxisRef) -> torch.Tensor:
        b = self.b[ref.tensor]
        for axis, entry in enumerate(self.spec.axes[ref.tensor]):
            if axis == ref.axis or entry is None:
                continue
            b = b.index_select(axis, full_index(entry, self.perms))
        return b

    def objective(self) -> float:
        """Σ_k ⟨A_k, π(B)_k⟩ over the tensors in the cost."""
        total = 0.0
        for name, a in self.a.items():
            b = self.b[name]
            for axis, entry in enumerate(self.spec.axes[name]):
                if entry is not None:
                    b = b.index_select(axis, full_index(entry, self.perms))
            total += float(torch.dot(a.reshape(-1), b.reshape(-1)))
        return total

    def step_group(self, group: str) -> bool:
        cost = self.cost(group)
        old = self.perms[group].cpu().numpy()
        new = _solve(cost)
        self.perms[group] = torch.as_tensor(new, dtype=torch.long, device=self.device)
        return _value(cost, new) > _value(cost, old) + IMPROVEMENT_EPS

    def step_attention(self, att: AttentionGroup) -> bool:
        c_qk, c_vo = self.cost(att.qk), self.cost(att.vo)
        old_qk, old_vo = self.perms[att.qk].cpu().numpy(), self.perms[att.vo].cpu().numpy()
        new_qk, new_vo = _solve_attention(att, c_qk, c_vo)
        self.perms[att.qk] = torch.as_tensor(new_qk, dtype=torch.long, device=self.device)
        self.perms[att.vo] = torch.as_tensor(new_vo, dtype=torch.long, device=self.device)
        before = _value(c_qk, old_qk) + _value(c_vo, old_vo)
        return _value(c_qk, new_qk) + _value(c_vo, new_vo) > before + IMPROVEMENT_EPS


def _working(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 on the device (float64 inputs stay float64)."""
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor.detach().to(device, dtype)


def _steps(spec: PermutationSpec) -> list[str | AttentionGroup]:
    """The units of the coordinate descent: plain groups, and attention groups as one unit each."""
    coupled = {g for att in spec.attention for g in (att.qk, att.vo)}
    units: list[str | AttentionGroup] = [g for g in spec.groups if g not in coupled]
    for att in spec.attention:
        if att.permute_heads or att.within_qk or att.within_vo:
            units.append(att)
    return units


def round_order(seed: int, round_index: int, count: int) -> list[int]:
    """The seeded visiting order of round `round_index` (a fresh shuffle every round)."""
    return [int(i) for i in np.random.default_rng([seed, round_index]).permutation(count)]


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` picks CUDA when present; a CUDA request without CUDA is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AlloyError(f"device '{device}' was asked for but CUDA is not available here")
    return dev


def weight_matching(spec: PermutationSpec, params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor], *,
                    seed: int = 0, max_rounds: int = 100, device: str | torch.device = "cpu",
                    init: Mapping[str, torch.Tensor] | None = None, progress: Progress | None = None) -> MatchResult:
    """Permutations of B's units that bring B closest to A (§8.3).

    `params_a`/`params_b` need only the tensors in `spec.cost_tensors()` (more
    are ignored). Cost matrices are float32 matmuls (float64 for float64
    inputs) on `device`, summed in float64; each assignment is solved exactly on the CPU. `progress(stage,
    done, total)` is called with stage "match" after each round; raising from
    it (e.g. `MergeCancelled`) stops the run. Deterministic given `seed`.
    """
    if max_rounds < 1:
        raise ValueError("max_rounds must be at least 1")
    dev = resolve_device(device)
    names = spec.cost_tensors()
    shapes_a = {n: tuple(params_a[n].shape) for n in names if n in params_a}
    for n in names:
        if n not in params_b:
            raise CheckpointError(None, "model B lacks a tensor the permutation spec needs", tensor=n)
        if n not in params_a:
            raise CheckpointError(None, "model A lacks a tensor the permutation spec needs", tensor=n)
        if tuple(params_b[n].shape) != shapes_a[n]:
            raise CheckpointError(None, f"model B's shape {tuple(params_b[n].shape)} differs from model A's {shapes_a[n]}", tensor=n)
    sub = PermutationSpec({n: spec.axes[n] for n in names}, (), frozenset(), spec.name)
    used = set(sub.groups)
    sub.attention = tuple(att for att in spec.attention if att.qk in used and att.vo in used)
    sizes = sub.validate(shapes_a)
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    if init:
        unknown = set(init) - set(sizes)
        if unknown:
            raise ValueError(f"init names groups the matching does not use: {sorted(unknown)}")
        perms.update({g: torch.as_tensor(p, dtype=torch.long).cpu() for g, p in init.items()})
        check_permutations(sub, perms, sizes)

    a = {n: _working(params_a[n], dev) for n in names}
    b = {n: _working(params_b[n], dev) for n in names}
    matcher = _Matcher(sub, a, b, perms, sizes, dev)
    steps = _steps(sub)
    objectives = [matcher.objective()]
    converged = False
    rounds = 0
    for round_index in range(max_rounds):
        gained = False
        for i in round_order(seed, round_index, len(steps)):
            step = steps[i]
            if isinstance(step, AttentionGroup):
                gained |= matcher.step_attention(step)
            else:
                gained |= matcher.step_group(step)
        rounds += 1
        objectives.append(matcher.objective())
        if progress is not None:
            progress("match", rounds, max_rounds)
        if not gained:
            converged = True
            break
    final = {g: p.cpu() for g, p in matcher.perms.items()}
    # Groups that act only on tensors outside the cost keep the identity.
    if all(n in params_a for n in spec.axes):
        full_sizes = spec.validate({n: tuple(params_a[n].shape) for n in spec.axes})
        for group, n in full_sizes.items():
            final.setdefault(group, torch.arange(n))
            sizes.setdefault(group, n)
    return MatchResult(final, objectives, rounds, converged, seed, spec.name, sizes)
