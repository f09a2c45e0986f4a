"""The analysis result: additive sums per tensor, and every plotted number derived from them.

Everything stored per tensor is a sum over the tensor's parameters (a count, a
dot product, a mass), already scaled by the sample weight when the tensor was
sampled. Sums add, so a layer's value and the model's value are sums of tensor
rows, and ratios (cosine, rates, fractions) are taken only at the end; that is
what keeps per-layer and overall numbers consistent, and what lets a density
slider move along the stored grid without reading a checkpoint again.

Shapes: T tensors, L layers, n models, K densities (ascending).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

RESULT_VERSION = 1

#: log10 bins shared by every histogram: 0.05 decade wide, covering all float32 magnitudes.
LOG_MIN = -46.0
LOG_STEP = 0.05
LOG_BINS = 1700

Level = Literal["overall", "layer", "tensor"]


def log_bin(log_values: np.ndarray) -> np.ndarray:
    """Fine-bin index of log10 values."""
    return np.clip(np.floor((log_values - LOG_MIN) / LOG_STEP), 0, LOG_BINS - 1).astype(np.int64)


def _sum(arr: np.ndarray, level: Level, layer_of: np.ndarray, n_layers: int) -> np.ndarray:
    if level == "tensor":
        return arr
    if level == "overall":
        return arr.sum(axis=0)
    if level == "layer":
        out = np.zeros((n_layers,) + arr.shape[1:], dtype=arr.dtype)
        np.add.at(out, layer_of, arr)
        return out
    raise ValueError(f"level must be 'overall', 'layer' or 'tensor', not {level!r}")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    out = np.zeros(num.shape)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _coarsen(hist: np.ndarray, start: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-bin fine log histograms (rows share edges) to about `bins` bins over their non-empty span."""
    total = hist.reshape(-1, hist.shape[-1]).sum(axis=0)
    nz = np.flatnonzero(total)
    if nz.size == 0:
        edges = LOG_MIN + LOG_STEP * (start + np.arange(2))
        return edges, np.zeros(hist.shape[:-1] + (1,))
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    group = max(1, math.ceil((hi - lo) / max(1, bins)))
    count = math.ceil((hi - lo) / group)
    padded = np.zeros(hist.shape[:-1] + (count * group,))
    padded[..., : hi - lo] = hist[..., lo:hi]
    counts = padded.reshape(hist.shape[:-1] + (count, group)).sum(axis=-1)
    edges = LOG_MIN + LOG_STEP * (start + lo + group * np.arange(count + 1))
    return edges, counts


# -- JSON --------------------------------------------------------------------------------

def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": str(value.dtype), "shape": list(value.shape), "data": value.reshape(-1).tolist()}
    if isinstance(value, _Serialisable):
        return {f"__{type(value).__name__}__": value.to_dict()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__ndarray__" in value:
        return np.asarray(value["data"], dtype=value["__ndarray__"]).reshape(value["shape"])
    if isinstance(value, dict) and len(value) == 1:
        (key, inner), = value.items()
        cls = _NESTED.get(key)
        if cls is not None:
            return cls.from_dict(inner)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class _Serialisable:
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _encode(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):  # type: ignore[no-untyped-def]
        version = data.get("version")
        if version != RESULT_VERSION:
            raise ValueError(f"analysis result version {version!r} is not {RESULT_VERSION}")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: _decode(v) for k, v in data.items() if k in names})

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str):  # type: ignore[no-untyped-def]
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path):  # type: ignore[no-untyped-def]
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


# -- alignment -------------------------------------------------------------------------------

@dataclass
class AlignmentResult(_Serialisable):
    """Per-tensor similarity of a reference and another model, before and after permutation."""

    reference_label: str
    other_label: str
    tensor_names: list[str]
    tensor_layer: np.ndarray  # (T,)
    layer_labels: list[str]
    numel: np.ndarray  # (T,)
    analysed: np.ndarray  # (T,)
    sampled: bool
    sample_size: int | None
    seed: int
    reference_sq: np.ndarray  # (T,) Σ θ_ref²
    other_sq: np.ndarray  # (T,) Σ θ_other²
    aligned_sq: np.ndarray  # (T,) Σ π(θ_other)²
    dot_before: np.ndarray  # (T,) Σ θ_ref θ_other
    dot_after: np.ndarray  # (T,) Σ θ_ref π(θ_other)
    match: dict[str, Any] = field(default_factory=dict)  # objective before/after, rounds, per group: name, size, moved
    version: int = RESULT_VERSION

    def _s(self, arr: np.ndarray, level: Level) -> np.ndarray:
        return _sum(arr, level, self.tensor_layer, len(self.layer_labels))

    def cosine_before(self, level: Level = "layer") -> np.ndarray:
        return _ratio(self._s(self.dot_before, level), np.sqrt(self._s(self.reference_sq, level) * self._s(self.other_sq, level)))

    def cosine_after(self, level: Level = "layer") -> np.ndarray:
        return _ratio(self._s(self.dot_after, level), np.sqrt(self._s(self.reference_sq, level) * self._s(self.aligned_sq, level)))

    def distance_before(self, level: Level = "layer") -> np.ndarray:
        """‖θ_ref − θ_other‖."""
        d = self._s(self.reference_sq, level) + self._s(self.other_sq, level) - 2 * self._s(self.dot_before, level)
        return np.sqrt(np.maximum(d, 0.0))

    def distance_after(self, level: Level = "layer") -> np.ndarray:
        """‖θ_ref − π(θ_other)‖."""
        d = self._s(self.reference_sq, level) + self._s(self.aligned_sq, level) - 2 * self._s(self.dot_after, level)
        return np.sqrt(np.maximum(d, 0.0))


# -- interference ------------------------------------------------------------------------------

@dataclass
class AnalysisResult(_Serialisable):
    """Interference diagnostics of n fine-tunes against one base (ALGORITHMS_DETAIL §9)."""

    model_labels: list[str]
    tensor_names: list[str]
    tensor_shapes: list[list[int]]
    tensor_layer: np.ndarray  # (T,) layer index of each tensor
    layer_labels: list[str]
    densities: np.ndarray  # (K,) ascending, in (0, 1]
    scope: str  # "global" or "tensor": where the trim / PCB thresholds are taken
    sampled: bool
    sample_size: int | None  # analysed elements per tensor (target) when sampled
    block_size: int | None  # sampled runs of consecutive parameters (None: 1/16 of each tensor's rows)
    seed: int
    pcb_ratio: float
    pcb_clip: float
    numel: np.ndarray  # (T,) parameters in the tensor
    analysed: np.ndarray  # (T,) parameters actually read
    gram: np.ndarray  # (T, n, n) Σ τ_i τ_j
    base_sq: np.ndarray  # (T,) Σ θ_0²
    zeros: np.ndarray  # (T, n) count of τ_i == 0
    kept: np.ndarray  # (T, n, K) count kept by the trim at each density
    contested: np.ndarray  # (T, K) count kept by >= 2 models
    conflicting: np.ndarray  # (T, K) count with kept entries of both signs
    pair_both: np.ndarray  # (T, K, n, n) count kept by both i and j
    pair_opposite: np.ndarray  # (T, K, n, n) count kept by both with opposite signs
    kept_mass: np.ndarray  # (T, K) Σ_i Σ_p |τ̂_i|
    discarded_mass: np.ndarray  # (T, K) Σ |τ̂_i| whose sign is not the elected sign
    trim_thresholds: np.ndarray  # (T, n, K) keep |τ| >= t (same row in every tensor for global scope)
    pcb_bounds: np.ndarray  # (T, n, 2) clamp bounds lo, hi of |τ|
    pcb_cutoff: np.ndarray  # (T, n) drop quantile q of the scores
    pcb_max: np.ndarray  # (T, n) largest score
    pcb_negative_inter: np.ndarray  # (T, n) count with inter-balancing < 0 (against the consensus)
    pcb_zero: np.ndarray  # (T, n) count with score exactly 0
    pcb_kept: np.ndarray  # (T, n) count with weight > 0
    pcb_weight_sum: np.ndarray  # (T, n) Σ weight
    magnitude_hist: np.ndarray  # (L, n, B) counts of log10|τ| (non-zero τ) on the shared fine bins
    magnitude_hist_start: int  # fine-bin index of column 0
    score_hist_pos: np.ndarray  # (L, n, B') counts of log10 s for s > 0
    score_hist_neg: np.ndarray  # (L, n, B') counts of log10(−s) for s < 0
    score_hist_start: int
    merged_dot: np.ndarray | None = None  # (T, n) Σ τ_merged τ_i
    merged_sq: np.ndarray | None = None  # (T,) Σ τ_merged²
    retention_source: str | None = None  # what τ_merged came from
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why it was not analysed
    trim_rule: str = "official"  # TIES trim: official keeps int(D·d)+1 entries, exact int(D·d)
    elapsed_s: float = 0.0
    version: int = RESULT_VERSION

    # -- shape -------------------------------------------------------------------------
    @property
    def n_models(self) -> int:
        return len(self.model_labels)

    @property
    def n_layers(self) -> int:
        return len(self.layer_labels)

    @property
    def total_params(self) -> int:
        return int(self.numel.sum())

    @property
    def analysed_params(self) -> int:
        return int(self.analysed.sum())

    def labels(self, level: Level) -> list[str]:
        return {"tensor": self.tensor_names, "layer": self.layer_labels, "overall": ["overall"]}[level]

    def _s(self, arr: np.ndarray, level: Level) -> np.ndarray:
        return _sum(arr, level, self.tensor_layer, self.n_layers)

    def _numel(self, level: Level) -> np.ndarray:
        return self._s(self.numel.astype(float), level)

    def _density_index(self, density: float) -> int:
        return int(np.argmin(np.abs(self.densities - float(density))))

    # -- similarity and norms --------------------------------------------------------------
    def cosine(self, level: Level = "overall") -> np.ndarray:
        """cos(τ_i, τ_j): (n, n) overall, (L, n, n) per layer, (T, n, n) per tensor; 0 where a norm is 0."""
        g = self._s(self.gram, level)
        d = np.sqrt(np.maximum(np.diagonal(g, axis1=-2, axis2=-1), 0.0))
        return _ratio(g, d[..., :, None] * d[..., None, :])

    def norms(self, level: Level = "overall") -> np.ndarray:
        """‖τ_i‖₂ per model: (n,), (L, n) or (T, n)."""
        return np.sqrt(np.maximum(np.diagonal(self._s(self.gram, level), axis1=-2, axis2=-1), 0.0))

    def rms(self, level: Level = "overall") -> np.ndarray:
        """‖τ_i‖₂ / √|P|, comparable across layers of different sizes."""
        return self.norms(level) / np.sqrt(self._numel(level))[..., None]

    def relative_norms(self, level: Level = "overall") -> np.ndarray:
        """‖τ_i‖ / ‖θ_0‖."""
        return _ratio(self.norms(level), np.sqrt(self._s(self.base_sq, level))[..., None])

    def alignment_ratio(self, level: Level = "overall") -> np.ndarray:
        """‖Σ_i τ_i‖ / Σ_i ‖τ_i‖ in [0, 1]: 1 for parallel task vectors, about 1/√n for orthogonal ones."""
        g = self._s(self.gram, level)
        return _ratio(np.sqrt(np.maximum(g.sum(axis=(-2, -1)), 0.0)), self.norms(level).sum(axis=-1))

    def zero_fraction(self, level: Level = "overall") -> np.ndarray:
        return self._s(self.zeros, level) / self._numel(level)[..., None]

    # -- sign conflicts (after trimming, per density) -----------------------------------------
    def sign_conflict(self, level: Level = "overall") -> np.ndarray:
        """|K| / |C| at each density: of the parameters kept by >= 2 models, the fraction with both signs kept."""
        return _ratio(self._s(self.conflicting, level), self._s(self.contested, level))

    def sign_conflict_at(self, density: float, level: Level = "overall") -> np.ndarray | float:
        """The rate at any density, linearly interpolated on the stored grid (clamped at its ends)."""
        rates = self.sign_conflict(level)
        if rates.ndim == 1:
            return float(np.interp(density, self.densities, rates))
        return np.array([np.interp(density, self.densities, row) for row in rates])

    def conflicting_fraction(self, level: Level = "overall") -> np.ndarray:
        """|K| / |P| at each density."""
        return self._s(self.conflicting, level) / self._numel(level)[..., None]

    def contested_fraction(self, level: Level = "overall") -> np.ndarray:
        """|C| / |P| at each density."""
        return self._s(self.contested, level) / self._numel(level)[..., None]

    def pairwise_conflict(self, density: float, level: Level = "overall") -> np.ndarray:
        """conf(i, j) at the grid density nearest `density`: opposite signs / both kept."""
        k = self._density_index(density)
        both = self._s(self.pair_both, level)[..., k, :, :]
        opp = self._s(self.pair_opposite, level)[..., k, :, :]
        return _ratio(opp, both)

    def discarded_mass_fraction(self, level: Level = "overall") -> np.ndarray:
        """Share of the trimmed |τ| mass whose sign loses the TIES election, per density."""
        return _ratio(self._s(self.discarded_mass, level), self._s(self.kept_mass, level))

    def kept_fraction(self, level: Level = "overall") -> np.ndarray:
        """Fraction of each model's parameters the trim keeps: (n, K), (L, n, K) or (T, n, K).

        With a global trim this shows where the kept parameters concentrate;
        layers can be starved.
        """
        return self._s(self.kept, level) / self._numel(level)[..., None, None]

    # -- magnitudes ----------------------------------------------------------------------------
    def magnitude_histogram(self, layer: int | None = None, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """(edges in log10 |τ|, counts (n, bins')) with edges shared by all models; exact zeros excluded."""
        hist = self.magnitude_hist.sum(axis=0) if layer is None else self.magnitude_hist[layer]
        return _coarsen(hist, self.magnitude_hist_start, bins)

    def threshold_for(self, model: int, density: float, layer: int | None = None) -> float:
        """|τ| threshold that keeps the top `density` fraction of model `model`'s parameters.

        Over the whole model with a global trim and a density on the grid, this
        is the stored exact (or sampled) threshold; between grid points it is
        interpolated in log space. Otherwise (one layer, or per-tensor scope)
        it is the quantile of the layer's (or the model's) |τ| read off the
        fine histogram (0.05-decade resolution).
        """
        density = float(density)
        if layer is None and self.scope == "global" and self.trim_thresholds.shape[0]:
            t = self.trim_thresholds[0, model]
            k = int(np.searchsorted(self.densities, density))
            if k < len(self.densities) and math.isclose(self.densities[k], density, rel_tol=1e-9, abs_tol=1e-12):
                return float(t[k])
            if 0 < k < len(self.densities) and t[k - 1] > 0 and t[k] > 0:
                d0, d1 = self.densities[k - 1], self.densities[k]
                frac = (density - d0) / (d1 - d0)
                return float(10 ** ((1 - frac) * math.log10(t[k - 1]) + frac * math.log10(t[k])))
        rows = self.tensor_layer == layer if layer is not None else slice(None)
        hist = (self.magnitude_hist[layer] if layer is not None else self.magnitude_hist.sum(axis=0))[model]
        total = float(self.numel[rows].sum())
        keep = density * total
        nonzero = float(hist.sum())
        if keep >= nonzero:
            return 0.0
        from_top = np.cumsum(hist[::-1])
        j = int(np.searchsorted(from_top, keep, side="right"))  # bins from the top fully kept
        b = len(hist) - 1 - min(j, len(hist) - 1)
        inside = hist[b]
        before = from_top[j - 1] if j > 0 else 0.0
        frac = 0.0 if inside <= 0 else (keep - before) / inside
        log_hi = LOG_MIN + LOG_STEP * (self.magnitude_hist_start + b + 1)
        return float(10 ** (log_hi - frac * LOG_STEP))

    # -- PCB ---------------------------------------------------------------------------------------
    def pcb_kept_fraction(self, level: Level = "overall") -> np.ndarray:
        """Fraction of each model's parameters with a non-zero PCB weight: (n,), (L, n) or (T, n)."""
        return self._s(self.pcb_kept, level) / self._numel(level)[..., None]

    def pcb_mean_weight(self, level: Level = "overall") -> np.ndarray:
        return self._s(self.pcb_weight_sum, level) / self._numel(level)[..., None]

    def pcb_negative_fraction(self, level: Level = "overall") -> np.ndarray:
        """Fraction of parameters where model i opposes the consensus (inter-balancing < 0)."""
        return self._s(self.pcb_negative_inter, level) / self._numel(level)[..., None]

    def pcb_score_histogram(self, layer: int | None = None, bins: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(edges in log10 |s|, positive-score counts (n, b), negative-score counts (n, b)), shared edges."""
        pos = self.score_hist_pos.sum(axis=0) if layer is None else self.score_hist_pos[layer]
        neg = self.score_hist_neg.sum(axis=0) if layer is None else self.score_hist_neg[layer]
        edges, both = _coarsen(np.stack([pos, neg]), self.score_hist_start, bins)
        return edges, both[0], both[1]

    def pcb_score_quantiles(self, model: int, qs: list[float] | np.ndarray, layer: int | None = None) -> np.ndarray:
        """Approximate quantiles of model `model`'s scores s (bin centres of the fine histogram)."""
        pos = (self.score_hist_pos.sum(axis=0) if layer is None else self.score_hist_pos[layer])[model]
        neg = (self.score_hist_neg.sum(axis=0) if layer is None else self.score_hist_neg[layer])[model]
        rows = self.tensor_layer == layer if layer is not None else slice(None)
        zero = float(self.pcb_zero[rows, model].sum())
        centres = 10 ** (LOG_MIN + LOG_STEP * (self.score_hist_start + np.arange(pos.size) + 0.5))
        values = np.concatenate([-centres[::-1], [0.0], centres])
        counts = np.concatenate([neg[::-1], [zero], pos])
        cum = np.cumsum(counts)
        if cum[-1] <= 0:
            return np.zeros(len(qs))
        idx = np.searchsorted(cum, np.asarray(qs, float) * cum[-1], side="left")
        return values[np.clip(idx, 0, values.size - 1)]

    # -- retention after a merge --------------------------------------------------------------------
    @property
    def has_retention(self) -> bool:
        return self.merged_dot is not None and self.merged_sq is not None

    def retention(self, level: Level = "overall") -> np.ndarray:
        """cos(τ_merged, τ_i) per model: (n,), (L, n) or (T, n)."""
        if self.merged_dot is None or self.merged_sq is None:
            raise ValueError("this analysis has no merge to compare with (pass `merged=`)")
        dot = self._s(self.merged_dot, level)
        msq = np.sqrt(np.maximum(self._s(self.merged_sq, level), 0.0))
        return _ratio(dot, msq[..., None] * self.norms(level))

    # -- text ------------------------------------------------------------------------------------
    def summary(self, density: float | None = None) -> str:
        """A few plain-text tables: the overall numbers a user checks first."""
        density = float(self.densities[len(self.densities) // 2]) if density is None else float(density)
        names = self.model_labels
        width = max(8, *(len(s) for s in names))
        lines = []
        how = (f"sampled: {self.analysed_params:,} of {self.total_params:,} parameters "
               f"({self.sample_size:,} per tensor, seed {self.seed})" if self.sampled
               else f"exact: {self.total_params:,} parameters")
        lines.append(f"{len(self.tensor_names)} tensors in {self.n_layers} layers; {how}; trim scope {self.scope}")
        lines.append("")
        lines.append("cosine similarity of task vectors")
        cos = self.cosine()
        lines.append(" " * width + "".join(f"{s[:width]:>{width + 2}}" for s in names))
        for i, s in enumerate(names):
            lines.append(f"{s:<{width}}" + "".join(f"{cos[i, j]:>{width + 2}.3f}" for j in range(len(names))))
        lines.append("")
        norms, rms = self.norms(), self.rms()
        lines.append(f"{'model':<{width}}  {'‖τ‖':>10}  {'RMS τ':>10}  {'‖τ‖/‖θ₀‖':>10}  {'kept@' + format(density, 'g'):>10}  {'PCB kept':>9}")
        rel, kept, pcb = self.relative_norms(), self.kept_fraction()[:, self._density_index(density)], self.pcb_kept_fraction()
        for i, s in enumerate(names):
            lines.append(f"{s:<{width}}  {norms[i]:>10.4g}  {rms[i]:>10.3g}  {rel[i]:>10.3g}  {kept[i]:>10.2%}  {pcb[i]:>9.2%}")
        lines.append("")
        rate = self.sign_conflict_at(density)
        lines.append(f"sign conflict at density {density:g}: {rate:.1%} of the parameters kept by two or more models; "
                     f"TIES discards {np.interp(density, self.densities, self.discarded_mass_fraction()):.1%} of the kept mass")
        lines.append(f"alignment ratio ‖Στ‖/Σ‖τ‖: {float(self.alignment_ratio()):.3f} (1 = parallel, {1 / math.sqrt(max(1, self.n_models)):.3f} = orthogonal)")
        if self.has_retention:
            ret = self.retention()
            lines.append("retention cos(τ_merged, τ_i): " + ", ".join(f"{s} {ret[i]:.3f}" for i, s in enumerate(names)))
        if self.skipped:
            lines.append(f"{len(self.skipped)} tensors not analysed (e.g. {next(iter(self.skipped))}: {next(iter(self.skipped.values()))})")
        return "\n".join(lines)


# -- a recipe's analysis ----------------------------------------------------------------------------

@dataclass
class RecipeAnalysis(_Serialisable):
    """What `alloy analyze RECIPE` computes: interference (when there is a base) and alignment (when asked)."""

    recipe: str  # the recipe file, for display
    merge_method: str
    density: float | None  # the recipe's trim density, where the plots draw their markers
    interference: AnalysisResult | None
    alignments: list[AlignmentResult] = field(default_factory=list)
    version: int = RESULT_VERSION


_NESTED = {f"__{c.__name__}__": c for c in (AnalysisResult, AlignmentResult, RecipeAnalysis)}
