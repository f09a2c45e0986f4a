"""Numba kernels for the analysis' per-parameter passes: one loop over the parameters does every count.

Each kernel is serial, compiled with `nogil`, and works on one range of the
parameter axis; `_ranges` cuts a large tensor into fixed-size ranges that run
on a small thread pool, and the per-range results are summed in range order,
so results do not depend on the number of threads. A sampled tensor (a few
thousand parameters) runs in one call on the calling thread: no thread
start-up per tensor. Inputs are float32 task vectors (n, m), C-contiguous;
every sum is float64.

Levels. For density grid index k (ascending densities, non-increasing
thresholds t_k), an entry with |τ| ≥ t_k is kept at k and at every larger k.
The *level* of an entry is the first k at which it is kept (K: never, and
always for τ = 0). Kernels return histograms over levels 0..K; a cumulative
sum turns one into counts at every density.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

_CACHE = os.environ.get("ALLOY_NUMBA_CACHE", "1") != "0"
RANGE = 1 << 20  # parameters per range of a large tensor (fixed, so sums do not depend on threads)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _ranges(m: int) -> list[tuple[int, int]]:
    return [(a, min(m, a + RANGE)) for a in range(0, max(m, 1), RANGE)]


def _map(fn, m: int, *args):  # type: ignore[no-untyped-def]
    """fn(*args, a, b) for each range of [0, m), on the pool when there is more than one range."""
    ranges = _ranges(m)
    if len(ranges) == 1 or numba.config.NUMBA_NUM_THREADS < 2:
        return [fn(*args, a, b) for a, b in ranges]
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=numba.config.NUMBA_NUM_THREADS, thread_name_prefix="alloy-analysis")
    return list(_pool.map(lambda r: fn(*args, r[0], r[1]), ranges))


_JIT = dict(cache=_CACHE, nogil=True, error_model="numpy")


def _sum_parts(parts: list[tuple]) -> tuple:
    """Element-wise sums of per-range results, in range order."""
    first = [np.array(x, copy=True) for x in parts[0]]
    for part in parts[1:]:
        for acc, x in zip(first, part):
            acc += x
    return tuple(first)


@njit(cache=_CACHE, inline="always")
def _level(a, thr_asc, i, K):
    """K − #(thresholds ≤ a): the first grid index whose threshold a reaches."""
    lo, hi = 0, K
    while lo < hi:  # first index with thr_asc[i, idx] > a
        mid = (lo + hi) // 2
        if thr_asc[i, mid] <= a:
            lo = mid + 1
        else:
            hi = mid
    return K - lo


@njit(**_JIT)
def _level_range(tau, thr_asc, a, b):
    n = tau.shape[0]
    K = thr_asc.shape[1]
    kept = np.zeros((n, K + 1), np.int64)
    contested = np.zeros(K + 1, np.int64)
    conflicting = np.zeros(K + 1, np.int64)
    both = np.zeros((n, n, K + 1), np.int64)
    opposite = np.zeros((n, n, K + 1), np.int64)
    kept_mass = np.zeros(K + 1, np.float64)
    disc_mass = np.zeros(K + 1, np.float64)
    first = np.empty(n, np.int64)
    order = np.empty(n, np.int64)
    for p in range(a, b):
        first_pos = K
        first_neg = K
        for i in range(n):
            x = np.float64(tau[i, p])
            if x == 0.0:
                lv = K
            else:
                lv = _level(abs(x), thr_asc, i, K)
                if x > 0.0:
                    first_pos = min(first_pos, lv)
                else:
                    first_neg = min(first_neg, lv)
            first[i] = lv
            kept[i, lv] += 1
        # models in order of their level (stable insertion sort; n is small)
        for i in range(n):
            order[i] = i
        for i in range(1, n):
            j = i
            while j > 0 and first[order[j - 1]] > first[order[j]]:
                order[j - 1], order[j] = order[j], order[j - 1]
                j -= 1
        if n >= 2:
            contested[first[order[1]]] += 1
            conflicting[max(first_pos, first_neg)] += 1
            for i in range(n):
                xi = tau[i, p]
                for j in range(i + 1, n):
                    lv = max(first[i], first[j])
                    both[i, j, lv] += 1
                    xj = tau[j, p]
                    if (xi > 0 and xj < 0) or (xi < 0 and xj > 0):
                        opposite[i, j, lv] += 1
        # the TIES election changes only when one more model is kept
        total = 0.0
        mass = 0.0
        positive = 0.0
        for r in range(n):
            i = order[r]
            x = np.float64(tau[i, p])
            total += x
            mass += abs(x)
            if x > 0.0:
                positive += x
            start = first[i]
            stop = first[order[r + 1]] if r + 1 < n else K
            if start >= stop:
                continue
            discarded = mass - positive if total > 0.0 else positive
            kept_mass[start] += mass
            kept_mass[stop] -= mass
            disc_mass[start] += discarded
            disc_mass[stop] -= discarded
    return kept, contested, conflicting, both, opposite, kept_mass, disc_mass


def level_counts(tau: np.ndarray, thr_asc: np.ndarray) -> tuple:
    """Per-level histograms of: each model's kept entries (n, K+1), contested and conflicting parameters,
    kept pairs and opposite-sign kept pairs (n, n, K+1; upper triangle), and difference arrays of the kept
    |τ| mass and of the mass TIES discards."""
    return _sum_parts(_map(_level_range, tau.shape[1], tau, thr_asc))


@njit(**_JIT)
def _moment_range(tau, base, log_min, log_step, nbins, a, b):
    n = tau.shape[0]
    gram = np.zeros((n, n), np.float64)
    zeros = np.zeros(n, np.int64)
    hist = np.zeros((n, nbins), np.int64)
    base_sq = np.zeros(1, np.float64)
    for p in range(a, b):
        v = np.float64(base[p])
        base_sq[0] += v * v
        for i in range(n):
            x = np.float64(tau[i, p])
            for j in range(i, n):
                gram[i, j] += x * np.float64(tau[j, p])
            if x == 0.0:
                zeros[i] += 1
            else:
                k = int(math.floor((math.log10(abs(x)) - log_min) / log_step))
                hist[i, min(max(k, 0), nbins - 1)] += 1
    return gram, base_sq, zeros, hist


def moment_counts(tau: np.ndarray, base: np.ndarray, log_min: float, log_step: float, nbins: int) -> tuple:
    """Σ τ_i τ_j (n, n), Σ θ_0², zero counts and log10|τ| histograms (non-zero τ) of one tensor slice."""
    gram, base_sq, zeros, hist = _sum_parts(_map(_moment_range, tau.shape[1], tau, base, log_min, log_step, nbins))
    gram = np.triu(gram) + np.triu(gram, 1).T
    return gram, float(base_sq[0]), zeros, hist


@njit(**_JIT)
def _score_range(tau, lo, hi, log_min, log_step, nbins, scores, a, b):
    n = tau.shape[0]
    negative = np.zeros(n, np.int64)
    zero = np.zeros(n, np.int64)
    pos_hist = np.zeros((n, nbins), np.int64)
    neg_hist = np.zeros((n, nbins), np.int64)
    top = np.full(n, -np.inf)
    for p in range(a, b):
        total = 0.0
        for j in range(n):
            total += np.float64(tau[j, p])
        for i in range(n):
            x = np.float64(tau[i, p])
            inter = math.tanh(x * total)
            if inter < 0.0:
                negative[i] += 1
            span = hi[i] - lo[i]
            mm = 0.0
            if span > 0.0:
                c = min(max(abs(x), lo[i]), hi[i])
                mm = (c - lo[i]) / span
            s = np.float32(math.exp(n * mm * mm) * inter)
            scores[i, p] = s
            v = np.float64(s)
            if v > top[i]:
                top[i] = v
            if v == 0.0:
                zero[i] += 1
            elif v > 0.0:
                k = int(math.floor((math.log10(v) - log_min) / log_step))
                pos_hist[i, min(max(k, 0), nbins - 1)] += 1
            else:
                k = int(math.floor((math.log10(-v) - log_min) / log_step))
                neg_hist[i, min(max(k, 0), nbins - 1)] += 1
    return negative, zero, pos_hist, neg_hist, top


def pcb_scores(tau: np.ndarray, lo: np.ndarray, hi: np.ndarray, log_min: float, log_step: float, nbins: int) -> tuple:
    """Official PCB scores (root variant) rounded to float32, with their statistics.

    s_i = exp(n · mm_i²) · tanh(τ_i · Σ_j τ_j), mm_i = (clamp(|τ_i|, lo_i, hi_i) − lo_i) / (hi_i − lo_i)
    (0 where hi_i = lo_i). Returns the scores (n, m), the count of inter-balancing < 0, of zero scores,
    log10 histograms of positive and of negative scores, and the largest score, per model.
    """
    scores = np.empty(tau.shape, np.float32)
    parts = _map(_score_range, tau.shape[1], tau, lo, hi, log_min, log_step, nbins, scores)
    negative, zero, pos_hist, neg_hist, _ = _sum_parts(parts)
    top = np.max(np.stack([part[4] for part in parts]), axis=0)
    return scores, negative, zero, pos_hist, neg_hist, top


@njit(**_JIT)
def _weight_range(scores, cutoff, top, a, b):
    n = scores.shape[0]
    kept = np.zeros(n, np.int64)
    wsum = np.zeros(n, np.float64)
    for i in range(n):
        q = cutoff[i]
        if not top[i] > q:
            continue
        scale = top[i] - q
        for p in range(a, b):
            v = np.float64(scores[i, p])
            if v > q:
                kept[i] += 1
                wsum[i] += (v - q) / scale
    return kept, wsum


def pcb_weight_counts(scores: np.ndarray, cutoff: np.ndarray, top: np.ndarray) -> tuple:
    """Count of scores above the cutoff q and Σ (s − q) / (max s − q) over them, per model (0 where max s ≤ q)."""
    return _sum_parts(_map(_weight_range, scores.shape[1], scores, cutoff, top))


@njit(**_JIT)
def _dot_range(tau, base, merged, a, b):
    n = tau.shape[0]
    dots = np.zeros(n, np.float64)
    sq = np.zeros(1, np.float64)
    for p in range(a, b):
        d = np.float64(merged[p]) - np.float64(base[p])
        sq[0] += d * d
        for i in range(n):
            dots[i] += np.float64(tau[i, p]) * d
    return dots, sq


def merged_dots(tau: np.ndarray, base: np.ndarray, merged: np.ndarray) -> tuple[np.ndarray, float]:
    """Σ τ_i · (θ_merged − θ_0) per model, and Σ (θ_merged − θ_0)²."""
    dots, sq = _sum_parts(_map(_dot_range, tau.shape[1], tau, base, merged))
    return dots, float(sq[0])
