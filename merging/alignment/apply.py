"""Applying permutations: to tensors, to state dicts, and lazily to whole checkpoints (§8.2).

On every axis a group `p` permutes, `new[..., i, ...] = old[..., perm[p][i], ...]`
(a take along the axis). Tensors outside the spec are returned unchanged.
`AlignedCheckpoint` does this one tensor at a time when asked, so an aligned
model streams into any merge or writer like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..checkpoint import Checkpoint
from ..errors import AlloyError, CheckpointError
from .spec import AxisEntry, PermutationSpec

Progress = Callable[[str, int, int], None]


def full_index(entry: AxisEntry, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The index array for one axis entry; a fused axis gets its segments' permutations, offset."""
    if isinstance(entry, str):
        return _perm(perms, entry)
    parts, offset = [], 0
    for group in entry:  # type: ignore[union-attr]
        p = _perm(perms, group)
        parts.append(p + offset)
        offset += len(p)
    return torch.cat(parts)


def _perm(perms: Mapping[str, torch.Tensor], group: str) -> torch.Tensor:
    try:
        return perms[group]
    except KeyError:
        raise AlloyError(f"no permutation given for group '{group}'") from None


def permute_tensor(tensor: torch.Tensor, entries: Sequence[AxisEntry], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One tensor with each permuted axis taken in its group's order."""
    for axis, entry in enumerate(entries):
        if entry is not None:
            index = full_index(entry, perms).to(tensor.device)
            tensor = tensor.index_select(axis, index)
    return tensor


def apply_permutations(spec: PermutationSpec, params: Mapping[str, torch.Tensor],
                       perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict: spec tensors permuted, every other tensor passed through as is."""
    return {n: permute_tensor(t, spec.axes[n], perms) if n in spec.axes else t for n, t in params.items()}


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """`inv[perm[i]] = i`: undoes `perm` when applied after it."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return inv


def check_permutations(spec: PermutationSpec, perms: Mapping[str, torch.Tensor], sizes: Mapping[str, int]) -> None:
    """Every group has a permutation of its size; attention groups keep heads whole (§8.4).

    Permutations breaking the head structure would change what the model
    computes, so they are refused rather than applied.
    """
    for group, n in sizes.items():
        if group not in perms:
            raise AlloyError(f"no permutation given for group '{group}'")
        p = torch.as_tensor(perms[group])
        if p.dim() != 1 or len(p) != n or p.dtype not in (torch.int64, torch.int32):
            raise AlloyError(f"permutation for group '{group}' must be {n} integer indices, got shape {tuple(p.shape)} {p.dtype}")
        if not torch.equal(torch.sort(p.cpu()).values, torch.arange(n, dtype=p.dtype)):
            raise AlloyError(f"permutation for group '{group}' is not a permutation of 0..{n - 1}")
    for att in spec.attention:
        for group, within in ((att.qk, att.within_qk), (att.vo, att.within_vo)):
            if group not in sizes:
                continue
            d = sizes[group] // att.num_heads
            blocks = torch.as_tensor(perms[group]).cpu().reshape(att.num_heads, d)
            heads = blocks // d
            if not torch.all(heads == heads[:, :1]):
                raise AlloyError(f"permutation for attention group '{group}' mixes dimensions of different heads")
            if not att.permute_heads and not torch.equal(heads[:, 0], torch.arange(att.num_heads)):
                raise AlloyError(f"permutation for attention group '{group}' moves heads, which the spec does not allow")
            if not within and not torch.all(blocks % d == torch.arange(d)):
                raise AlloyError(f"permutation for attention group '{group}' moves dimensions within a head, which the spec does not allow")
    for att in spec.attention:
        if att.qk in sizes and att.vo in sizes:
            dq, dv = sizes[att.qk] // att.num_heads, sizes[att.vo] // att.num_heads
            heads_qk = torch.as_tensor(perms[att.qk]).cpu()[::dq] // dq
            heads_vo = torch.as_tensor(perms[att.vo]).cpu()[::dv] // dv
            if not torch.equal(heads_qk, heads_vo):
                raise AlloyError(f"attention groups '{att.qk}' and '{att.vo}' move heads differently; Q, K, V and O must share one head permutation")


def random_permutations(spec: PermutationSpec, sizes: Mapping[str, int], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random permutations that respect the spec (whole heads, dims within heads); for tests and demos."""
    gen = torch.Generator().manual_seed(seed)
    perms = {g: torch.randperm(n, generator=gen) for g, n in sizes.items()}
    for att in spec.attention:
        h = att.num_heads
        sigma = torch.randperm(h, generator=gen) if att.permute_heads else torch.arange(h)
        for group, within in ((att.qk, att.within_qk), (att.vo, att.within_vo)):
            d = sizes[group] // h
            perms[group] = torch.cat([
                sigma[i] * d + (torch.randperm(d, generator=gen) if within else torch.arange(d)) for i in range(h)
            ])
    return perms


class AlignedCheckpoint(Checkpoint):
    """Another checkpoint seen through permutations: same names, shapes and dtypes, permuted tensors.

    Reads stay lazy: `get(name)` reads that one tensor from the wrapped
    checkpoint and permutes it.
    """

    def __init__(self, checkpoint: Checkpoint, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]):
        super().__init__(checkpoint.path)
        self.inner = checkpoint
        self.format = checkpoint.format
        self.spec = spec
        self._infos = checkpoint.infos()
        sizes = spec.validate({n: i.shape for n, i in self._infos.items()}, checkpoint.path)
        self.perms = {g: torch.as_tensor(perms[g], dtype=torch.long).cpu() for g in sizes if g in perms}
        check_permutations(spec, self.perms, sizes)

    def _load(self, name: str) -> torch.Tensor:
        tensor = self.inner.get(name)
        entries = self.spec.axes.get(name)
        return tensor if entries is None else permute_tensor(tensor, entries, self.perms)

    @property
    def folder(self) -> Path:
        return self.inner.folder

    def config(self) -> dict | None:
        return self.inner.config()

    def files(self) -> list[Path]:
        return self.inner.files()

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"<AlignedCheckpoint spec={self.spec.name} of {self.inner!r}>"


class InterpolatedCheckpoint(Checkpoint):
    """`(1 − α)·A + α·B` tensor by tensor (§8.7); non-float tensors come from A.

    With B an `AlignedCheckpoint` this is the aligned merge; α = 0.5 is the
    merged model. Computed in float32 (float64 stays float64), stored in A's dtype.
    """

    format = "interpolated"

    def __init__(self, a: Checkpoint, b: Checkpoint, alpha: float):
        super().__init__(a.path)
        if not 0.0 <= float(alpha) <= 1.0:
            raise AlloyError(f"alpha must be between 0 and 1, not {alpha}")
        self.a, self.b, self.alpha = a, b, float(alpha)
        self._infos = a.infos()
        for name, info in self._infos.items():
            if name not in b:
                raise CheckpointError(b.path, "the other model has no tensor by this name", tensor=name)
            if b.info(name).shape != info.shape:
                raise CheckpointError(b.path, f"shape {b.info(name).shape} differs from {info.shape} in {a.path}", tensor=name)

    def _load(self, name: str) -> torch.Tensor:
        ta = self.a.get(name)
        if not ta.dtype.is_floating_point:
            return ta
        tb = self.b.get(name)
        work = torch.promote_types(ta.dtype, torch.float32)
        mixed = torch.lerp(ta.to(work), tb.to(work), self.alpha)
        return mixed.to(ta.dtype)

    @property
    def folder(self) -> Path:
        return self.a.folder

    def config(self) -> dict | None:
        return self.a.config()

    def files(self) -> list[Path]:
        return self.a.files() + self.b.files()

    def close(self) -> None:
        self.a.close()
        self.b.close()


def align_checkpoint(reference: Checkpoint, other: Checkpoint, spec: "PermutationSpec | str | Path", *,
                     seed: int = 0, max_rounds: int = 100, device: str = "cpu", num_heads: int | None = None,
                     attention: str = "heads", progress: Progress | None = None):
    """Align `other` to `reference` by weight matching; returns `(AlignedCheckpoint, MatchResult)`.

    The spec (a built-in name, a spec file or a `PermutationSpec`) is checked
    against both checkpoints' headers first. Then only the tensors the spec
    puts in the cost are read, from both models, and held (as float32 on
    `device`) while matching. `progress(stage, done, total)` reports "load"
    per tensor and "match" per round; raising from it stops the run.
    """
    from .builtin_specs import load_spec
    from .weight_matching import _working, resolve_device, weight_matching

    ref_shapes = {n: i.shape for n, i in reference.infos().items()}
    spec = load_spec(spec, ref_shapes, config=reference.config(), num_heads=num_heads, attention=attention, path=reference.path)
    other_shapes = {n: i.shape for n, i in other.infos().items()}
    spec.validate(other_shapes, other.path)
    for name in spec.axes:
        if other_shapes[name] != ref_shapes[name]:
            raise CheckpointError(other.path, f"shape {other_shapes[name]} differs from the reference's {ref_shapes[name]} ({reference.path})", tensor=name)
    dev = resolve_device(device)
    names = spec.cost_tensors()
    params_a: dict[str, torch.Tensor] = {}
    params_b: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        params_a[name] = _working(reference.get(name), dev)
        params_b[name] = _working(other.get(name), dev)
        if progress is not None:
            progress("load", i + 1, len(names))
    result = weight_matching(spec, params_a, params_b, seed=seed, max_rounds=max_rounds, device=dev, progress=progress)
    del params_a, params_b
    sizes = spec.validate(ref_shapes, reference.path)
    for group, n in sizes.items():
        result.perms.setdefault(group, torch.arange(n))
        result.sizes.setdefault(group, n)
    return AlignedCheckpoint(other, spec, result.perms), result


def align_models(reference: Checkpoint, models: Sequence[Checkpoint], spec: "PermutationSpec | str | Path", *,
                 seed: int = 0, max_rounds: int = 100, device: str = "cpu", num_heads: int | None = None,
                 attention: str = "heads", progress: Progress | None = None):
    """Align every model to `reference` before a merge (the recipe's `alignment` section).

    Returns `(checkpoints, results)`: the reference itself (same object or same
    path) passes through unchanged with result None; every other model becomes
    an `AlignedCheckpoint`.
    """
    out: list[Checkpoint] = []
    results = []
    ref_path = Path(reference.path).resolve()
    for index, model in enumerate(models):
        if model is reference or Path(model.path).resolve() == ref_path:
            out.append(model)
            results.append(None)
            continue
        step = None
        if progress is not None:
            step = lambda stage, done, total, i=index: progress(f"align model {i}: {stage}", done, total)  # noqa: E731
        aligned, result = align_checkpoint(reference, model, spec, seed=seed, max_rounds=max_rounds, device=device,
                                           num_heads=num_heads, attention=attention, progress=step)
        out.append(aligned)
        results.append(result)
    return out, results
