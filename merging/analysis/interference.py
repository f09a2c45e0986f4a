"""How much n fine-tunes of one base fight each other: the numbers behind the preview plots.

`analyze` streams the tensors the base and every model share (floating point,
same shape) and fills an `AnalysisResult` (ALGORITHMS_DETAIL §9): pairwise
cosine similarity and norms of the task vectors τ_i = θ_i − θ_0; the TIES
trim (§4, official rule: keep |τ| ≥ the (⌊D·d⌋+1)-th largest) and, on what it
keeps, sign conflicts, the pairwise conflict matrix and the mass TIES discards,
for a whole grid of densities at once; log-magnitude histograms; PCB scores
(§7.2, `root` variant) with their distribution and the fraction each model
keeps; and, given a merge, retention cos(τ_merged, τ_i).

The density grid costs no extra pass. With the thresholds t_i(d_k) known
(non-increasing in k), each parameter gets, per model, the first grid index at
which it is kept; every count at every density is then a cumulative histogram
of such indices (conflict: the later of the first positive and the first
negative index; contested: the second smallest index). The TIES election
changes only when one more model is kept, so the discarded mass is spread over
index ranges the same way. A slider then moves along the stored grid.

Scopes. `tensor`: thresholds within each tensor, one pass. `global` (the
official TIES and PCB scope): thresholds over the whole model, found exactly by
counting (`quantiles.WeightedSelect`), five passes over the data; the data is
held in memory between passes when it fits `memory_budget` (always, for a
sample), so the checkpoints are read once.

Sampling. Above `sampling.AUTO_EXACT_MAX_PARAMS` parameters (or when asked)
each tensor is read on a seeded uniform sample (`sampling.plan_sample`) and
every sum is scaled by the sample weight, so a 7B-class trio takes seconds.

All arithmetic on τ is float32 (τ itself) and float64 (sums, dot products,
scores); the PCB scores are rounded to float32 before their quantile is taken,
as the kernels do.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..errors import AlloyError, CheckpointError
from ..kernels.select import KEEP_ALL, KEEP_NONE, pcb_clip_positions, pcb_drop_position, trim_position
from ..progress import CancelToken, ProgressCallback, ProgressEvent, ProgressTracker
from ..kernels.keys import float_to_key
from . import counting
from .cache import AnalysisCache, cache_key
from .grouping import layer_groups
from .quantiles import WeightedSelect, local_order_stats
from .result import LOG_BINS, LOG_MIN, LOG_STEP, AnalysisResult
from .sampling import AUTO_EXACT_MAX_PARAMS, DEFAULT_SAMPLE_SIZE, TensorSample, block_for, plan_sample, read_values, release_maps

DEFAULT_DENSITIES: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 21))
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of task vectors kept between passes
SCOPES = ("global", "tensor")
TRIM_RULES = ("official", "exact")
_NEVER = float(np.finfo(np.float32).max)  # a threshold no finite float32 magnitude exceeds

MergedStream = Callable[[], Iterable[tuple[str, "torch.Tensor | None", torch.Tensor]]]


# -- inputs ---------------------------------------------------------------------------------

def model_label(ckpt: Checkpoint) -> str:
    """A short name for a checkpoint: its folder for `folder/model.safetensors`, else its file or folder name."""
    path = Path(ckpt.path)
    if path.suffix and path.parent.name and path.stem.split("-")[0] in ("model", "pytorch_model", "diffusion_pytorch_model", "adapter_model"):
        return path.parent.name
    return path.name or str(path)


def shared_tensors(base: Checkpoint, models: Sequence[Checkpoint]) -> tuple[list[str], dict[str, str]]:
    """Float tensors of the base that every model has with a compatible shape; the rest, with the reason.

    A model tensor with more rows than the base's (a grown vocabulary) is
    compared on the base's rows, as the merge does with `truncate`.
    """
    names, skipped = [], {}
    for name in base.names():
        info = base.info(name)
        if not info.is_float:
            skipped[name] = "not floating point"
            continue
        if info.numel == 0:
            skipped[name] = "empty"
            continue
        why = None
        for ck in models:
            if name not in ck:
                why = f"missing from {ck.path}"
                break
            other = ck.info(name)
            if not other.is_float:
                why = f"not floating point in {ck.path}"
                break
            same = other.shape == info.shape
            grown = len(other.shape) == len(info.shape) >= 1 and other.shape[1:] == info.shape[1:] and other.shape[0] > info.shape[0]
            if not (same or grown):
                why = f"shape {list(other.shape)} in {ck.path} differs from {list(info.shape)} in the base"
                break
        if why is None:
            names.append(name)
        else:
            skipped[name] = why
    return names, skipped


def _check_finite(values: torch.Tensor, ck: Checkpoint, name: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise CheckpointError(ck.path, "contains NaN or Inf values; the analysis needs finite weights", tensor=name)


# -- accumulators -------------------------------------------------------------------------------

@dataclass
class _Sums:
    n: int
    T: int
    L: int
    K: int

    def __post_init__(self) -> None:
        n, T, L, K = self.n, self.T, self.L, self.K
        self.gram = np.zeros((T, n, n))
        self.base_sq = np.zeros(T)
        self.zeros = np.zeros((T, n))
        self.kept = np.zeros((T, n, K))
        self.contested = np.zeros((T, K))
        self.conflicting = np.zeros((T, K))
        self.pair_both = np.zeros((T, K, n, n))
        self.pair_opposite = np.zeros((T, K, n, n))
        self.kept_mass = np.zeros((T, K))
        self.discarded_mass = np.zeros((T, K))
        self.trim_thresholds = np.zeros((T, n, K))
        self.pcb_bounds = np.zeros((T, n, 2))
        self.pcb_cutoff = np.zeros((T, n))
        self.pcb_max = np.full((T, n), -np.inf)
        self.pcb_negative_inter = np.zeros((T, n))
        self.pcb_zero = np.zeros((T, n))
        self.pcb_kept = np.zeros((T, n))
        self.pcb_weight_sum = np.zeros((T, n))
        self.magnitude_hist = np.zeros((L, n, LOG_BINS))
        self.score_hist_pos = np.zeros((L, n, LOG_BINS))
        self.score_hist_neg = np.zeros((L, n, LOG_BINS))
        self.merged_dot: np.ndarray | None = None
        self.merged_sq: np.ndarray | None = None

    def enable_retention(self) -> None:
        if self.merged_dot is None:
            self.merged_dot = np.zeros((self.T, self.n))
            self.merged_sq = np.zeros(self.T)


def _cumulative(level_hist: np.ndarray) -> np.ndarray:
    """Counts at each density from a histogram over levels 0..K (level K: never kept)."""
    return np.cumsum(level_hist[..., :-1], axis=-1, dtype=np.float64)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy())


def _moments(s: _Sums, t: int, layer: int, tau: torch.Tensor, base: torch.Tensor, w: float,
             merged: torch.Tensor | None) -> None:
    x = _np(tau)
    gram, base_sq, zeros, hist = counting.moment_counts(x, _np(base), LOG_MIN, LOG_STEP, LOG_BINS)
    s.gram[t] += w * gram
    s.base_sq[t] += w * base_sq
    s.zeros[t] += w * zeros
    s.magnitude_hist[layer] += w * hist
    if merged is not None:
        dots, sq = counting.merged_dots(x, _np(base), _np(merged))
        s.merged_dot[t] += w * dots  # type: ignore[index]
        s.merged_sq[t] += w * sq  # type: ignore[index]


def _conflicts(s: _Sums, t: int, tau: torch.Tensor, thresholds: np.ndarray, w: float) -> None:
    """Counts at every density from the first grid index at which each entry is kept (see `counting`)."""
    ascending = np.ascontiguousarray(thresholds[:, ::-1], dtype=np.float64).copy()
    kept, contested, conflicting, both, opposite, kept_mass, disc_mass = counting.level_counts(_np(tau), ascending)
    n = tau.shape[0]
    kept_c = _cumulative(kept)
    both_c = np.moveaxis(_cumulative(both), -1, 0)  # (K, n, n), upper triangle
    opp_c = np.moveaxis(_cumulative(opposite), -1, 0)
    both_c = both_c + np.transpose(both_c, (0, 2, 1))
    opp_c = opp_c + np.transpose(opp_c, (0, 2, 1))
    for i in range(n):
        both_c[:, i, i] = kept_c[i]
    s.kept[t] += w * kept_c
    s.contested[t] += w * _cumulative(contested)
    s.conflicting[t] += w * _cumulative(conflicting)
    s.pair_both[t] += w * both_c
    s.pair_opposite[t] += w * opp_c
    s.kept_mass[t] += w * np.cumsum(kept_mass)[:-1]
    s.discarded_mass[t] += w * np.cumsum(disc_mass)[:-1]


def _pcb_scores(tau: torch.Tensor, bounds: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Official PCB scores (float32) and their statistics (see `counting.pcb_scores`)."""
    lo = np.ascontiguousarray(bounds[:, 0], dtype=np.float64)
    hi = np.ascontiguousarray(bounds[:, 1], dtype=np.float64)
    scores, *stats = counting.pcb_scores(_np(tau), lo, hi, LOG_MIN, LOG_STEP, LOG_BINS)
    return scores, tuple(stats)


def _score_stats(s: _Sums, t: int, layer: int, stats: tuple, w: float) -> None:
    negative, zero, pos_hist, neg_hist, top = stats
    s.pcb_negative_inter[t] += w * negative
    s.pcb_zero[t] += w * zero
    s.score_hist_pos[layer] += w * pos_hist
    s.score_hist_neg[layer] += w * neg_hist
    s.pcb_max[t] = np.maximum(s.pcb_max[t], top)


def _pcb_weights(s: _Sums, t: int, scores: np.ndarray, cutoff: np.ndarray, top: np.ndarray, w: float) -> None:
    """Kept count and weight sum of w_i = (max(s, q) − q) / (max s − q) (0 where nothing is above q)."""
    kept, wsum = counting.pcb_weight_counts(scores, np.ascontiguousarray(cutoff, dtype=np.float64),
                                            np.ascontiguousarray(top, dtype=np.float64))
    s.pcb_kept[t] += w * kept
    s.pcb_weight_sum[t] += w * wsum


# -- positions of the order statistics --------------------------------------------------------------

def _trim_positions(total: int, densities: Sequence[float], rule: str) -> list[int | str]:
    return [trim_position(total, d, rule) for d in densities]


def _thresholds_from(rules: list[int | str], values: Iterator[float]) -> np.ndarray:
    out = []
    for r in rules:
        if r == KEEP_ALL:
            out.append(0.0)  # keep every non-zero entry (zeros are never kept)
        elif r == KEEP_NONE:
            out.append(_NEVER)
        else:
            out.append(next(values))
    return np.asarray(out)


# -- reading -------------------------------------------------------------------------------------------

class _Source:
    """Task vectors of each analysed tensor, read from the checkpoints or kept from the first read."""

    def __init__(self, base: Checkpoint, models: Sequence[Checkpoint], names: list[str], samples: list[TensorSample],
                 merged: Checkpoint | None, keep: bool):
        self.base, self.models, self.names, self.samples = base, list(models), names, samples
        self.merged = merged
        self.keep = keep
        self._kept: dict[int, torch.Tensor] = {}

    def read(self, t: int, with_merged: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        name, sample = self.names[t], self.samples[t]
        base = read_values(self.base, name, sample)
        _check_finite(base, self.base, name)
        tau = torch.empty((len(self.models), sample.size), dtype=torch.float32)
        for i, ck in enumerate(self.models):
            v = read_values(ck, name, sample)
            _check_finite(v, ck, name)
            torch.sub(v, base, out=tau[i])
        merged = None
        if with_merged and self.merged is not None:
            merged = read_values(self.merged, name, sample)
            _check_finite(merged, self.merged, name)
        if self.keep:
            self._kept[t] = tau
        return tau, base, merged

    def tau(self, t: int) -> torch.Tensor:
        hit = self._kept.get(t)
        return hit if hit is not None else self.read(t)[0]

    def first_pass(self, order: list[int], cancel: CancelToken | None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Read every tensor once, the next one on a helper thread while the current one is analysed."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alloy-analysis-read")
        try:
            pending = pool.submit(self.read, order[0], True) if order else None
            for k, t in enumerate(order):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                assert pending is not None
                tau, base, merged = pending.result()
                pending = pool.submit(self.read, order[k + 1], True) if k + 1 < len(order) else None
                yield t, tau, base, merged
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def again(self, order: list[int], cancel: CancelToken | None) -> Iterator[tuple[int, torch.Tensor]]:
        for t in order:
            if cancel is not None:
                cancel.raise_if_cancelled()
            yield t, self.tau(t)


# -- the analysis ----------------------------------------------------------------------------------------

def _validate(densities: Sequence[float], scope: str, trim_rule: str, pcb_ratio: float, pcb_clip: float, n: int) -> np.ndarray:
    if n < 1:
        raise AlloyError("the analysis needs at least one fine-tuned model")
    if scope not in SCOPES:
        raise AlloyError(f"scope must be one of {', '.join(SCOPES)}, not '{scope}'")
    if trim_rule not in TRIM_RULES:
        raise AlloyError(f"trim_rule must be one of {', '.join(TRIM_RULES)}, not '{trim_rule}'")
    try:
        grid = np.unique(np.asarray([float(d) for d in densities], dtype=np.float64))
    except (TypeError, ValueError):
        raise AlloyError(f"densities must be numbers, not {densities!r}") from None
    if grid.size == 0 or grid[0] <= 0 or grid[-1] > 1:
        raise AlloyError(f"densities must lie in (0, 1], got {list(densities)}")
    if not 0 < pcb_ratio <= 1:
        raise AlloyError(f"pcb_ratio must lie in (0, 1], not {pcb_ratio}")
    if not 0 <= pcb_clip < 0.5:
        raise AlloyError(f"pcb_clip must lie in [0, 0.5), not {pcb_clip}")
    return grid


def analyze(
    base: Checkpoint,
    models: Sequence[Checkpoint],
    *,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    sample_size: int | None = None,
    exact: bool | None = None,
    seed: int = 0,
    scope: str = "global",
    trim_rule: str = "official",
    pcb_ratio: float = 0.1,
    pcb_clip: float = 1e-4,
    merged: Checkpoint | MergedStream | None = None,
    merged_key: str | None = None,
    labels: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    cache_dir: str | Path | None = None,
    block_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> AnalysisResult:
    """Interference diagnostics of `models` against `base`.

    `exact`: True reads every parameter; False samples; None (default) is exact
    up to `sampling.AUTO_EXACT_MAX_PARAMS` parameters and sampled above.
    `sample_size`: analysed parameters per tensor when sampling (default
    `sampling.DEFAULT_SAMPLE_SIZE`); giving it asks for sampling unless `exact`
    is True. `block_size`: sampled runs of consecutive parameters (None: 1/16
    of each tensor's rows, 16 to 256; see `sampling`). `merged`: a merged Checkpoint, or a callable returning an iterator
    of `(name, base_tensor, merged_tensor)` (the executor's dry run), for
    retention; a callable is cached only with a `merged_key` naming it.
    `cache_dir`: where results are cached (None: no cache). Progress events
    have stage "analyze"; a set `cancel` raises `MergeCancelled` within one
    tensor's work.
    """
    started = time.perf_counter()
    models = list(models)
    grid = _validate(densities, scope, trim_rule, pcb_ratio, pcb_clip, len(models))
    names, skipped = shared_tensors(base, models)
    if not names:
        raise AlloyError(f"{base.path}: no floating-point tensor is shared by the base and every model; nothing to analyse")
    numels = [base.info(nm).numel for nm in names]
    if exact is None:
        exact = sample_size is None and sum(numels) <= AUTO_EXACT_MAX_PARAMS
    size = None if exact else int(sample_size or DEFAULT_SAMPLE_SIZE)
    if size is not None and size < 1:
        raise AlloyError(f"sample_size must be at least 1, not {size}")
    labels = list(labels) if labels is not None else [model_label(ck) for ck in models]
    if len(labels) != len(models):
        raise AlloyError(f"{len(labels)} labels for {len(models)} models")

    merged_ckpt = merged if isinstance(merged, Checkpoint) else None
    merged_stream = merged if (merged is not None and merged_ckpt is None) else None
    cache = AnalysisCache(cache_dir) if cache_dir is not None else None
    key = None
    if cache is not None and (merged_stream is None or merged_key is not None):
        params = {
            "densities": grid.tolist(), "exact": exact, "sample_size": size, "block": block_size, "seed": seed,
            "scope": scope, "trim_rule": trim_rule, "pcb_ratio": pcb_ratio, "pcb_clip": pcb_clip, "merged_key": merged_key,
        }
        key = cache_key([base, *models] + ([merged_ckpt] if merged_ckpt is not None else []), params)
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                hit.model_labels = labels
                return hit

    samples = [plan_sample(nm, ne, size, block=block_for(base.info(nm).shape, block_size), seed=seed) for nm, ne in zip(names, numels)]
    layer_labels, layer_of = layer_groups(names)
    n, T, K = len(models), len(names), grid.size
    sums = _Sums(n, T, len(layer_labels), K)
    if merged_ckpt is not None or merged_stream is not None:
        sums.enable_retention()

    passes = ["analyse"] if scope == "tensor" else ["moments", "magnitudes", "conflicts", "scores", "weights"]
    if merged_stream is not None:
        passes.append("retention")
    analysed = sum(sm.size for sm in samples)
    keep = len(passes) > 1 and analysed * n * 4 * (2 if scope == "global" else 1) <= memory_budget  # τ (+ PCB scores)
    source = _Source(base, models, names, samples, merged_ckpt, keep)
    work = [sm.size * (n + 1) * 4 for sm in samples]
    tracker = ProgressTracker("analyze", T * len(passes), sum(work) * len(passes), progress, cancel)
    order = list(range(T))

    def step(p: int, t: int) -> None:
        tracker.step(work[t], f"pass {p + 1}/{len(passes)} ({passes[p]}): {names[t]}")

    if cancel is not None:
        cancel.raise_if_cancelled()
    tracker.emit("reading")
    try:
        if scope == "tensor":
            _tensor_scope(sums, source, order, layer_of, grid, trim_rule, pcb_ratio, pcb_clip, cancel, lambda t: step(0, t))
        else:
            _global_scope(sums, source, order, layer_of, grid, trim_rule, pcb_ratio, pcb_clip, cancel, step)
        if merged_stream is not None:
            _retention_from_stream(sums, source, merged_stream, names, cancel, tracker, lambda t: step(len(passes) - 1, t))
    finally:
        release_maps()

    result = _result(sums, labels, names, [list(base.info(nm).shape) for nm in names], layer_of, layer_labels, grid,
                     scope, size, block_size, seed, pcb_ratio, pcb_clip, numels, samples, skipped)
    result.trim_rule = trim_rule
    if merged_ckpt is not None:
        result.retention_source = f"merged checkpoint {merged_ckpt.path}"
    elif merged_stream is not None:
        result.retention_source = merged_key or "dry-run merge"
    result.elapsed_s = time.perf_counter() - started
    if cache is not None and key is not None:
        cache.put(key, result)
    return result


def _tensor_scope(sums: _Sums, source: _Source, order: list[int], layer_of: list[int], grid: np.ndarray, trim_rule: str,
                  pcb_ratio: float, pcb_clip: float, cancel: CancelToken | None, step: Callable[[int], None]) -> None:
    """Every threshold within its own tensor: one pass."""
    n = sums.n
    for t, tau, base, merged in source.first_pass(order, cancel):
        sample = source.samples[t]
        w, D = sample.weight, sample.numel
        _moments(sums, t, layer_of[t], tau, base, w, merged)
        mags = np.abs(_np(tau))
        rules = _trim_positions(D, grid, trim_rule)
        wanted = [r for r in rules if isinstance(r, int)]
        lo_pos, hi_pos = pcb_clip_positions(D, pcb_clip)
        for i in range(n):
            vals = local_order_stats(mags[i], w, [*wanted, lo_pos, hi_pos])
            sums.trim_thresholds[t, i] = _thresholds_from(rules, iter(vals[: len(wanted)]))
            sums.pcb_bounds[t, i] = vals[len(wanted):]
        _conflicts(sums, t, tau, sums.trim_thresholds[t], w)
        scores, stats = _pcb_scores(tau, sums.pcb_bounds[t])
        _score_stats(sums, t, layer_of[t], stats, w)
        drop = pcb_drop_position(D, pcb_ratio)
        for i in range(n):
            # No drop position: nothing is kept, as with a cutoff at the largest score.
            sums.pcb_cutoff[t, i] = sums.pcb_max[t, i] if drop is None else local_order_stats(scores[i], w, [drop])[0]
        _pcb_weights(sums, t, scores, sums.pcb_cutoff[t], sums.pcb_max[t], w)
        step(t)


def _global_scope(sums: _Sums, source: _Source, order: list[int], layer_of: list[int], grid: np.ndarray, trim_rule: str,
                  pcb_ratio: float, pcb_clip: float, cancel: CancelToken | None, step: Callable[[int, int], None]) -> None:
    """Thresholds over the whole model, found exactly by counting; five passes (in memory when they fit)."""
    n = sums.n
    D = sum(sm.numel for sm in source.samples)

    def again() -> Iterator[tuple[int, torch.Tensor]]:
        return source.again(order, cancel)

    # 1: moments and histograms; top bits of |τ|
    mags = WeightedSelect(n)
    for t, tau, base, merged in source.first_pass(order, cancel):
        w = source.samples[t].weight
        _moments(sums, t, layer_of[t], tau, base, w, merged)
        for i in range(n):
            mags.add_hi(i, float_to_key(np.abs(_np(tau[i]))), w)
        step(0, t)
    rules = _trim_positions(D, grid, trim_rule)
    wanted = [r for r in rules if isinstance(r, int)]
    lo_pos, hi_pos = pcb_clip_positions(D, pcb_clip)
    mags.set_positions([[*wanted, lo_pos, hi_pos] for _ in range(n)])

    # 2: low bits of |τ| -> exact trim thresholds and PCB clamp bounds
    for t, tau in again():
        w = source.samples[t].weight
        for i in range(n):
            mags.add_lo(i, float_to_key(np.abs(_np(tau[i]))), w)
        step(1, t)
    values = mags.values()
    thresholds = np.stack([_thresholds_from(rules, iter(values[i][: len(wanted)])) for i in range(n)])
    bounds = np.asarray([values[i][len(wanted):] for i in range(n)])
    sums.trim_thresholds[:] = thresholds
    sums.pcb_bounds[:] = bounds

    # 3: conflicts at every density; PCB scores, their distribution, top bits
    drop = pcb_drop_position(D, pcb_ratio)
    picks = WeightedSelect(n)
    kept_scores: dict[int, np.ndarray] = {}
    for t, tau in again():
        w = source.samples[t].weight
        _conflicts(sums, t, tau, thresholds, w)
        scores, stats = _pcb_scores(tau, bounds)
        _score_stats(sums, t, layer_of[t], stats, w)
        if source.keep:
            kept_scores[t] = scores  # scores are as big as the task vectors kept in memory
        for i in range(n):
            picks.add_hi(i, float_to_key(scores[i]), w)
        step(2, t)
    top = sums.pcb_max.max(axis=0)
    if drop is None:
        cutoff = top.copy()  # nothing is kept
        for t in order:
            step(3, t)
    else:
        picks.set_positions([[drop] for _ in range(n)])
        # 4: low bits of the scores -> the drop quantile
        for t, tau in again():
            scores = kept_scores.get(t)
            if scores is None:
                scores, _ = _pcb_scores(tau, bounds)
            for i in range(n):
                picks.add_lo(i, float_to_key(scores[i]), source.samples[t].weight)
            step(3, t)
        cutoff = np.asarray([v[0] for v in picks.values()])
    sums.pcb_cutoff[:] = cutoff
    sums.pcb_max[:] = top

    # 5: PCB weights against the global quantile
    for t, tau in again():
        scores = kept_scores.pop(t, None)
        if scores is None:
            scores, _ = _pcb_scores(tau, bounds)
        _pcb_weights(sums, t, scores, cutoff, top, source.samples[t].weight)
        step(4, t)


def _retention_from_stream(sums: _Sums, source: _Source, stream: MergedStream, names: list[str], cancel: CancelToken | None,
                           tracker: ProgressTracker, step: Callable[[int], None]) -> None:
    """cos(τ_merged, τ_i) from a dry-run merge that yields whole merged tensors."""
    index = {nm: t for t, nm in enumerate(names)}
    seen: set[int] = set()

    def forward(ev: ProgressEvent) -> None:
        if tracker.callback is not None and tracker.done < tracker.total:
            tracker.callback(ProgressEvent("analyze", tracker.done, tracker.total, tracker.bytes_done, tracker.bytes_total,
                                           time.perf_counter() - tracker.started, f"dry-run merge ({ev.stage}): {ev.message}"))

    iterator = stream(progress=forward, cancel=cancel) if _accepts_progress(stream) else stream()
    for name, base_t, merged_t in iterator:
        if cancel is not None:
            cancel.raise_if_cancelled()
        t = index.get(name)
        if t is None or t in seen:
            continue
        seen.add(t)
        sample = source.samples[t]
        idx = None if sample.index is None else torch.from_numpy(sample.index)

        def at(x: torch.Tensor) -> torch.Tensor:
            flat = x.detach().reshape(-1)[: sample.numel].to("cpu", torch.float64)
            return flat if idx is None else flat[idx]

        base_v = at(base_t) if base_t is not None else read_values(source.base, name, sample).to(torch.float64)
        tm = at(merged_t) - base_v
        x = source.tau(t).to(torch.float64)
        sums.merged_dot[t] += sample.weight * (x @ tm).numpy()  # type: ignore[index]
        sums.merged_sq[t] += sample.weight * float((tm * tm).sum())  # type: ignore[index]
        step(t)
    for t in range(len(names)):
        if t not in seen:
            step(t)


def _accepts_progress(fn: Callable[..., Any]) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "progress" in params and "cancel" in params


def _result(sums: _Sums, labels: list[str], names: list[str], shapes: list[list[int]], layer_of: list[int], layer_labels: list[str],
            grid: np.ndarray, scope: str, size: int | None, block: int, seed: int, pcb_ratio: float, pcb_clip: float,
            numels: list[int], samples: list[TensorSample], skipped: dict[str, str]) -> AnalysisResult:
    def trimmed(*hists: np.ndarray) -> tuple[list[np.ndarray], int]:
        total = sum(h.sum(axis=(0, 1)) for h in hists)
        nz = np.flatnonzero(total)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 1)
        return [np.ascontiguousarray(h[..., lo:hi]) for h in hists], lo

    (mag,), mag_start = trimmed(sums.magnitude_hist)
    (pos, neg), score_start = trimmed(sums.score_hist_pos, sums.score_hist_neg)
    return AnalysisResult(
        model_labels=labels,
        tensor_names=names,
        tensor_shapes=shapes,
        tensor_layer=np.asarray(layer_of, dtype=np.int64),
        layer_labels=layer_labels,
        densities=grid,
        scope=scope,
        sampled=size is not None,
        sample_size=size,
        block_size=block,
        seed=seed,
        pcb_ratio=pcb_ratio,
        pcb_clip=pcb_clip,
        numel=np.asarray(numels, dtype=np.int64),
        analysed=np.asarray([sm.size for sm in samples], dtype=np.int64),
        gram=sums.gram,
        base_sq=sums.base_sq,
        zeros=sums.zeros,
        kept=sums.kept,
        contested=sums.contested,
        conflicting=sums.conflicting,
        pair_both=sums.pair_both,
        pair_opposite=sums.pair_opposite,
        kept_mass=sums.kept_mass,
        discarded_mass=sums.discarded_mass,
        trim_thresholds=sums.trim_thresholds,
        pcb_bounds=sums.pcb_bounds,
        pcb_cutoff=sums.pcb_cutoff,
        pcb_max=sums.pcb_max,
        pcb_negative_inter=sums.pcb_negative_inter,
        pcb_zero=sums.pcb_zero,
        pcb_kept=sums.pcb_kept,
        pcb_weight_sum=sums.pcb_weight_sum,
        magnitude_hist=mag,
        magnitude_hist_start=mag_start,
        score_hist_pos=pos,
        score_hist_neg=neg,
        score_hist_start=score_start,
        merged_dot=sums.merged_dot,
        merged_sq=sums.merged_sq,
        skipped=skipped,
    )
