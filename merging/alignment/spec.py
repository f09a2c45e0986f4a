"""Permutation specs: which permutation group relabels each axis of each tensor.

A spec is data about names and shapes only, so it can be built and checked
from checkpoint headers without reading any weights (ALGORITHMS_DETAIL.md §8.1).

An axis entry is one of
- `None`: the axis is never permuted (network inputs, outputs, vocabulary rows);
- a group name: the axis is permuted by that group;
- a tuple of group names: a fused axis made of consecutive segments, one per
  name, each permuted by its own group (GPT-2's `c_attn` holds Q, K and V
  side by side: `("P_qk.0", "P_qk.0", "P_vo.0")`).

Attention groups couple a Q/K group and a V/O group of one attention layer so
that heads move as whole units and each head's dimensions stay inside it
(§8.4); weight matching solves such a pair as one step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

from ..errors import CheckpointError, RecipeError

AxisEntry = Union[str, None, tuple[str, ...]]
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class AttentionGroup:
    """One multi-head attention layer: Q/K share `qk`, V/O share `vo`, both with `num_heads` blocks.

    `permute_heads` lets whole heads move (one head permutation shared by Q, K,
    V and O); `within_qk` / `within_vo` let dimensions move inside each head
    (switch `within_qk` off for rotary position embeddings).
    """

    qk: str
    vo: str
    num_heads: int
    permute_heads: bool = True
    within_qk: bool = True
    within_vo: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "qk": self.qk,
            "vo": self.vo,
            "num_heads": self.num_heads,
            "permute_heads": self.permute_heads,
            "within_qk": self.within_qk,
            "within_vo": self.within_vo,
        }


@dataclass(frozen=True)
class AxisRef:
    """One place a group acts: axis `axis` of `tensor`, restricted to `[offset, offset+size)` on fused axes."""

    tensor: str
    axis: int
    offset: int | None = None
    size: int | None = None


@dataclass
class PermutationSpec:
    """Tensor name -> one entry per axis; plus attention couplings and cost exclusions.

    `cost_exclude` names tensors that are permuted but left out of the matching
    objective (BatchNorm running statistics are statistics, not weights: §8.3).
    """

    axes: dict[str, tuple[AxisEntry, ...]]
    attention: tuple[AttentionGroup, ...] = ()
    cost_exclude: frozenset[str] = field(default_factory=frozenset)
    name: str = "custom"

    def __post_init__(self) -> None:
        self.axes = {n: tuple(_normalise_entry(e) for e in entries) for n, entries in self.axes.items()}
        self.attention = tuple(self.attention)
        self.cost_exclude = frozenset(self.cost_exclude)

    # -- derived views ------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        """Group names in order of first appearance (a stable order for matching and reports)."""
        seen: dict[str, None] = {}
        for entries in self.axes.values():
            for entry in entries:
                for group in _entry_groups(entry):
                    seen.setdefault(group)
        return list(seen)

    def tensors_of(self, group: str) -> list[str]:
        return [n for n, entries in self.axes.items() if any(group in _entry_groups(e) for e in entries)]

    def permuted_tensors(self) -> list[str]:
        """Tensors with at least one permuted axis (the ones alignment changes)."""
        return [n for n, entries in self.axes.items() if any(e is not None for e in entries)]

    def cost_tensors(self) -> list[str]:
        """Tensors whose values enter the matching objective."""
        return [n for n in self.permuted_tensors() if n not in self.cost_exclude]

    def attention_of(self, group: str) -> AttentionGroup | None:
        for att in self.attention:
            if group in (att.qk, att.vo):
                return att
        return None

    def perm_to_axes(self, sizes: Mapping[str, int], tensors: Iterable[str] | None = None) -> dict[str, list[AxisRef]]:
        """Group -> every (tensor, axis, segment) it permutes; the inverse of `axes` (§8.1)."""
        wanted = None if tensors is None else set(tensors)
        out: dict[str, list[AxisRef]] = {g: [] for g in self.groups}
        for name, entries in self.axes.items():
            if wanted is not None and name not in wanted:
                continue
            for axis, entry in enumerate(entries):
                if isinstance(entry, str):
                    out[entry].append(AxisRef(name, axis))
                elif isinstance(entry, tuple):
                    offset = 0
                    for group in entry:
                        out[group].append(AxisRef(name, axis, offset, sizes[group]))
                        offset += sizes[group]
        return out

    # -- checking against a checkpoint ----------------------------------------
    def validate(self, shapes: Shapes, path: str | Path | None = None) -> dict[str, int]:
        """Check the spec fits these tensor shapes; return each group's size.

        Every error names the tensor: a tensor the checkpoint lacks, a wrong
        number of axes, or an axis whose size disagrees with its group's.
        """
        for name, entries in self.axes.items():
            if name not in shapes:
                raise CheckpointError(path, f"the permutation spec '{self.name}' names this tensor but the checkpoint has none by that name", tensor=name)
            shape = tuple(shapes[name])
            if len(entries) != len(shape):
                raise CheckpointError(
                    path, f"the permutation spec '{self.name}' gives {len(entries)} axes but the tensor has shape {shape}", tensor=name
                )
            used: list[str] = []
            for entry in entries:
                groups = set(_entry_groups(entry))
                clash = groups.intersection(used)
                if clash:
                    raise RecipeError(
                        f"tensors.{name}", f"permutation group '{sorted(clash)[0]}' appears on two axes of this tensor; a group may permute only one axis of a tensor"
                    )
                used.extend(groups)
        for name in self.cost_exclude:
            if name not in self.axes:
                raise RecipeError("exclude_from_cost", f"tensor '{name}' is not in the spec's tensors")

        sizes: dict[str, int] = {}
        origin: dict[str, tuple[str, int]] = {}

        def claim(group: str, size: int, name: str, axis: int) -> None:
            if group not in sizes:
                sizes[group] = size
                origin[group] = (name, axis)
            elif sizes[group] != size:
                first, first_axis = origin[group]
                raise CheckpointError(
                    path,
                    f"axis {axis} has size {size} but permutation group '{group}' has size {sizes[group]} "
                    f"(from tensor '{first}' axis {first_axis}); the spec '{self.name}' does not fit this checkpoint",
                    tensor=name,
                )

        fused: list[tuple[str, int, tuple[str, ...]]] = []
        for name, entries in self.axes.items():
            for axis, entry in enumerate(entries):
                if isinstance(entry, str):
                    claim(entry, int(shapes[name][axis]), name, axis)
                elif isinstance(entry, tuple):
                    fused.append((name, axis, entry))
        # Fused axes: solve for a group seen only there (its size is what the others leave).
        pending = list(fused)
        while pending:
            still = []
            for name, axis, entry in pending:
                unknown = {g for g in entry if g not in sizes}
                if len(unknown) > 1:
                    still.append((name, axis, entry))
                    continue
                total = int(shapes[name][axis])
                known = sum(sizes[g] for g in entry if g in sizes)
                if unknown:
                    group = unknown.pop()
                    count = entry.count(group)
                    rest = total - known
                    if rest <= 0 or rest % count:
                        raise CheckpointError(path, f"fused axis {axis} of size {total} cannot be split into segments {list(entry)}", tensor=name)
                    claim(group, rest // count, name, axis)
                elif known != total:
                    raise CheckpointError(
                        path,
                        f"fused axis {axis} has size {total} but its segments {list(entry)} add up to {known}; "
                        f"the spec '{self.name}' does not fit this checkpoint",
                        tensor=name,
                    )
            if len(still) == len(pending):
                name, axis, entry = still[0]
                raise RecipeError(f"tensors.{name}", f"cannot tell the segment sizes of fused axis {axis} {list(entry)}; give one of its groups a plain axis elsewhere")
            pending = still

        coupled: set[str] = set()
        for att in self.attention:
            for group in (att.qk, att.vo):
                if group not in sizes:
                    raise RecipeError("attention", f"group '{group}' is not used by any tensor of the spec")
                if group in coupled:
                    raise RecipeError("attention", f"group '{group}' belongs to two attention groups")
                coupled.add(group)
                if att.num_heads < 1 or sizes[group] % att.num_heads:
                    tensor = self.tensors_of(group)[0]
                    raise CheckpointError(path, f"permutation group '{group}' has size {sizes[group]}, not a multiple of {att.num_heads} heads", tensor=tensor)
        return sizes

    # -- (de)serialising ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The spec-file form (YAML/JSON): `tensors`, `attention`, `exclude_from_cost`."""
        tensors = {n: [list(e) if isinstance(e, tuple) else e for e in entries] for n, entries in self.axes.items()}
        out: dict[str, Any] = {"name": self.name, "tensors": tensors}
        if self.attention:
            out["attention"] = [a.to_dict() for a in self.attention]
        if self.cost_exclude:
            out["exclude_from_cost"] = sorted(self.cost_exclude)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> "PermutationSpec":
        if not isinstance(data, dict) or not isinstance(data.get("tensors"), dict):
            raise RecipeError("tensors", "a spec file is a mapping with `tensors: {tensor name: [group or null per axis]}`", source)
        for key in data:
            if key not in ("name", "tensors", "attention", "exclude_from_cost"):
                raise RecipeError(key, "unknown key (known: name, tensors, attention, exclude_from_cost)", source)
        axes: dict[str, tuple[AxisEntry, ...]] = {}
        for tensor, entries in data["tensors"].items():
            if not isinstance(entries, list):
                raise RecipeError(f"tensors.{tensor}", "must be a list with one entry per axis (a group name, null, or a list of group names for a fused axis)", source)
            parsed: list[AxisEntry] = []
            for entry in entries:
                if entry is None or isinstance(entry, str):
                    parsed.append(entry)
                elif isinstance(entry, list) and entry and all(isinstance(g, str) for g in entry):
                    parsed.append(tuple(entry))
                else:
                    raise RecipeError(f"tensors.{tensor}", f"axis entry {entry!r} is not a group name, null, or a list of group names", source)
            axes[str(tensor)] = tuple(parsed)
        attention = []
        for i, raw in enumerate(data.get("attention") or []):
            key = f"attention[{i}]"
            if not isinstance(raw, dict) or not {"qk", "vo", "num_heads"} <= set(raw):
                raise RecipeError(key, "needs qk, vo and num_heads", source)
            unknown = set(raw) - {"qk", "vo", "num_heads", "permute_heads", "within_qk", "within_vo"}
            if unknown:
                raise RecipeError(f"{key}.{sorted(unknown)[0]}", "unknown key (known: qk, vo, num_heads, permute_heads, within_qk, within_vo)", source)
            heads = raw["num_heads"]
            if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
                raise RecipeError(f"{key}.num_heads", f"must be a positive whole number, not {heads!r}", source)
            flags = {}
            for flag in ("permute_heads", "within_qk", "within_vo"):
                if flag in raw:
                    if not isinstance(raw[flag], bool):
                        raise RecipeError(f"{key}.{flag}", f"must be true or false, not {raw[flag]!r}", source)
                    flags[flag] = raw[flag]
            attention.append(AttentionGroup(str(raw["qk"]), str(raw["vo"]), heads, **flags))
        exclude = data.get("exclude_from_cost") or []
        if not isinstance(exclude, list) or not all(isinstance(n, str) for n in exclude):
            raise RecipeError("exclude_from_cost", "must be a list of tensor names", source)
        return cls(axes, tuple(attention), frozenset(exclude), str(data.get("name", "custom")))


def _normalise_entry(entry: Any) -> AxisEntry:
    if isinstance(entry, list):
        entry = tuple(entry)
    if isinstance(entry, tuple) and len(entry) == 1:
        return entry[0]
    return entry


def _entry_groups(entry: AxisEntry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(dict.fromkeys(entry))


def read_spec_file(path: str | Path) -> PermutationSpec:
    """A hand-written spec from YAML or JSON (see `PermutationSpec.to_dict` for the layout)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError("spec", f"cannot read the spec file: {exc.strerror or exc}", path) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise RecipeError("spec", f"the spec file does not parse: {exc}", path) from None
    spec = PermutationSpec.from_dict(data, source=path)
    if spec.name == "custom":
        spec.name = path.name
    return spec


def write_spec_file(spec: PermutationSpec, path: str | Path) -> None:
    """Write a spec as YAML (or JSON for `.json`), e.g. a built-in one to edit by hand."""
    import yaml

    path = Path(path)
    data = spec.to_dict()
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None), encoding="utf-8")
