"""Numba CPU kernels for the per-parameter passes of TIES, DARE, Breadcrumbs and PCB.

Every kernel is `@njit(parallel=True, cache=True)` over chunks of the
parameter axis and takes float32 C-contiguous arrays, so each compiles once
(one signature) and later launches load it from the cache. No kernel reduces
floats across chunks: per-parameter sums run over the models in index order,
and the only cross-chunk results are integer counts, which makes every result
independent of the number of threads.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Sequence

import numba
import numpy as np
import torch
from numba import njit, prange

from .base import MODE_ABS_DELTA, PROVISIONAL, Backend, Flat, as_f32
from .keys import GOLDEN32
from .keys import RankPlan, key_to_float

_PARALLEL_MIN = 1 << 16  # below this many parameters a kernel runs serially (no thread launch)
_HIST_CHUNK = 1 << 18  # parameters per chunk of a counting pass (each chunk owns its histograms)
_MAX_CHUNK = 1 << 30  # keeps int32 per-chunk counts from overflowing
_BLOCK = 256  # parameters per block in the blocked kernels (inner loops vectorise over a block)


def _cache_enabled() -> bool:
    """Cache compiled kernels on disk unless told not to or unable to.

    `ALLOY_NUMBA_CACHE=0` turns caching off. In a frozen app numba can only cache
    when this module's source file exists on disk; then the cache goes to
    `NUMBA_CACHE_DIR` or, if unset, the user's cache folder. Otherwise kernels
    compile once per launch.
    """
    if os.environ.get("ALLOY_NUMBA_CACHE", "1") == "0":
        return False
    if getattr(sys, "frozen", False):
        if not os.path.exists(__file__):
            return False
        if not numba.config.CACHE_DIR:
            root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            numba.config.CACHE_DIR = os.path.join(root, "alloy", "numba")
    return True


_CACHE = _cache_enabled()
SAMPLE = 1 << 14  # values sampled to bracket a rank in tensor-scope selection


def _chunks(m: int, per_chunk: int = _PARALLEL_MIN, per_thread: int = 4) -> int:
    """Number of chunks to split m parameters into; 1 means run serially."""
    if m < per_chunk:
        return 1
    return int(max(1, min(numba.get_num_threads() * per_thread, m // per_chunk), -(-m // _MAX_CHUNK)))


# -- scalar helpers (inlined into the kernels) ---------------------------------

@njit(inline="always", cache=_CACHE)
def _key(v):
    if v == 0:
        v = np.float32(0.0)
    b = np.int64(np.float32(v).view(np.uint32))
    if b < 0x80000000:
        return b | 0x80000000
    return (~b) & 0xFFFFFFFF


@njit(inline="always", cache=_CACHE)
def _fmix32(x):
    """MurmurHash3's finaliser in uint32 lanes (the casts keep the multiplies 32-bit, so the loop vectorises)."""
    x = np.uint32(x)
    x ^= x >> np.uint32(16)
    x = np.uint32(x * np.uint32(0x85EBCA6B))
    x ^= x >> np.uint32(13)
    x = np.uint32(x * np.uint32(0xC2B2AE35))
    x ^= x >> np.uint32(16)
    return np.uint32(x)


@njit(inline="always", cache=_CACHE)
def _sign(x):
    if x > 0:
        return 1
    if x < 0:
        return -1
    return 0


@njit(inline="always", cache=_CACHE)
def _value(models, base, w, mode, j, p):
    if mode == 0:
        return abs((models[j, p] - base[p]) * w[j])
    return models[j, p]


# Every op is a serial `_*_range(..., start, stop, ...)` over parameters
# [start, stop) plus a parallel driver that runs it on chunks. Small tensors
# call the range function directly, which avoids waking the thread pool.

# -- counting passes -------------------------------------------------------------

@njit(cache=_CACHE)
def _hist_hi_range(models, base, w, mode, start, stop, hist):
    n = models.shape[0]
    for p in range(start, stop):
        for j in range(n):
            hist[j, _key(_value(models, base, w, mode, j, p)) >> 16] += 1


@njit(parallel=True, cache=_CACHE)
def _hist_hi_kernel(models, base, w, mode, nch, out):
    n, m = models.shape
    part = np.zeros((nch, n, 65536), np.int32)
    step = (m + nch - 1) // nch
    for c in prange(nch):
        _hist_hi_range(models, base, w, mode, c * step, min(m, (c + 1) * step), part[c])
    for c in range(nch):
        for j in range(n):
            for k in range(65536):
                out[j, k] += part[c, j, k]


@njit(cache=_CACHE)
def _hist_lo_range(models, base, w, mode, prefixes, lo_val, hi_val, start, stop, hist):
    """Low 16 key bits of the values in each wanted bin.

    [lo_val, hi_val] pre-filters by value: per block, the indices of values in
    range are compacted without branches (store always, advance if in range),
    then only those are keyed and counted. A conditional scattered increment in
    the main loop is several times slower.
    """
    n = models.shape[0]
    kk = prefixes.shape[1]
    found = np.empty(_BLOCK, np.int64)
    for j in range(n):
        mj = models[j]
        wj = w[j]
        lo = lo_val[j]
        hi = hi_val[j]
        for p0 in range(start, stop, _BLOCK):
            p1 = min(stop, p0 + _BLOCK)
            count = 0
            for p in range(p0, p1):
                v = abs((mj[p] - base[p]) * wj) if mode == 0 else mj[p]
                found[count] = p
                count += 1 if ((v >= lo) & (v <= hi)) else 0
            for i in range(count):
                p = found[i]
                v = abs((mj[p] - base[p]) * wj) if mode == 0 else mj[p]
                key = _key(v)
                top = key >> 16
                for k in range(kk):
                    if prefixes[j, k] == top:
                        hist[j, k, key & 0xFFFF] += 1


@njit(parallel=True, cache=_CACHE)
def _hist_lo_kernel(models, base, w, mode, prefixes, lo_val, hi_val, nch, out):
    n, m = models.shape
    kk = prefixes.shape[1]
    part = np.zeros((nch, n, kk, 65536), np.int32)
    step = (m + nch - 1) // nch
    for c in prange(nch):
        _hist_lo_range(models, base, w, mode, prefixes, lo_val, hi_val, c * step, min(m, (c + 1) * step), part[c])
    for c in range(nch):
        for j in range(n):
            for k in range(kk):
                for q in range(65536):
                    out[j, k, q] += part[c, j, k, q]


# -- bracketed selection (tensor scope) ------------------------------------------------

@njit(cache=_CACHE)
def _bracket_range(models, base, w, mode, lo, hi, start, stop, below, inside, buf):
    """Count values below [lo, hi] and copy the ones inside it.

    The copy is branch-free (store always, advance if inside); slot `cap` of the
    buffer absorbs the stores once it is full, and `inside` keeps counting, so
    an overflow shows as inside > cap.
    """
    n = models.shape[0]
    kk = lo.shape[1]
    cap = buf.shape[2] - 1
    for j in range(n):
        mj = models[j]
        wj = w[j]
        for k in range(kk):
            l = lo[j, k]
            h = hi[j, k]
            out = buf[j, k]
            nb = 0
            ni = 0
            for p in range(start, stop):
                v = abs((mj[p] - base[p]) * wj) if mode == 0 else mj[p]
                nb += 1 if v < l else 0
                out[min(ni, cap)] = v
                ni += 1 if ((v >= l) & (v <= h)) else 0
            below[j, k] = nb
            inside[j, k] = ni


@njit(parallel=True, cache=_CACHE)
def _bracket_kernel(models, base, w, mode, lo, hi, nch, below, inside, buf):
    m = models.shape[1]
    step = (m + nch - 1) // nch
    for c in prange(nch):
        _bracket_range(models, base, w, mode, lo, hi, min(m, c * step), min(m, (c + 1) * step), below[c], inside[c], buf[c])


# -- TIES -------------------------------------------------------------------------

@njit(cache=_CACHE)
def _ties_sign_range(models, base, w, lo_thr, hi_thr, start, stop):
    n = models.shape[0]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    s = np.empty(_BLOCK, np.float32)
    unsure = np.empty(_BLOCK, np.float32)
    certain = 0
    undecided = 0
    for p0 in range(start, stop, _BLOCK):
        size = min(_BLOCK, stop - p0)
        bs = base[p0:p0 + size]
        s[:size] = zero
        unsure[:size] = zero
        for j in range(n):
            mj = models[j, p0:p0 + size]
            wj = w[j]
            lo = lo_thr[j]
            hi = hi_thr[j]
            for q in range(size):
                t = (mj[q] - bs[q]) * wj
                a = abs(t)
                s[q] += t if a >= hi else zero
                unsure[q] += one if ((a < hi) & (a >= lo) & (t != zero)) else zero
        for q in range(size):
            if unsure[q] > zero:
                undecided += 1
            else:
                certain += _sign(s[q])
    return certain, undecided


@njit(parallel=True, cache=_CACHE)
def _ties_sign_kernel(models, base, w, lo_thr, hi_thr, nch):
    m = models.shape[1]
    certain = np.zeros(nch, np.int64)
    undecided = np.zeros(nch, np.int64)
    step = (m + nch - 1) // nch
    for c in prange(nch):
        cs, un = _ties_sign_range(models, base, w, lo_thr, hi_thr, c * step, min(m, (c + 1) * step))
        certain[c] = cs
        undecided[c] = un
    return certain.sum(), undecided.sum()




@njit(inline="always", cache=_CACHE)
def _ties_finish(acc, cnt, wsum, mx, g, merge, weighted):
    if merge == 0:
        denom = wsum if weighted else cnt
        return acc / denom if denom > 0 else np.float32(0.0)
    if merge == 1:
        return acc
    return mx * g


@njit(cache=_CACHE)
def _ties_merge_range(models, base, w, thr, lam, merge, weighted, majority, start, stop, out):
    """Blocked: per block of parameters, models outside and parameters inside, branch-free selects."""
    n = models.shape[0]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    s = np.empty(_BLOCK, np.float32)
    kept = np.empty(_BLOCK, np.float32)
    g = np.empty(_BLOCK, np.float32)
    acc = np.empty(_BLOCK, np.float32)
    cnt = np.empty(_BLOCK, np.float32)
    wsum = np.empty(_BLOCK, np.float32)
    mx = np.empty(_BLOCK, np.float32)
    gsum = 0
    fallback = 0
    for p0 in range(start, stop, _BLOCK):
        size = min(_BLOCK, stop - p0)
        bs = base[p0:p0 + size]
        s[:size] = zero
        kept[:size] = zero
        for j in range(n):
            mj = models[j, p0:p0 + size]
            wj = w[j]
            tj = thr[j]
            for q in range(size):
                t = (mj[q] - bs[q]) * wj
                keep = abs(t) >= tj
                s[q] += t if keep else zero
                kept[q] += one if (keep & (t != zero)) else zero
        for q in range(size):
            gg = _sign(s[q])
            gsum += gg
            if gg == 0:
                if kept[q] > zero:
                    fallback += 1
                gg = majority
            g[q] = np.float32(gg)
        acc[:size] = zero
        cnt[:size] = zero
        wsum[:size] = zero
        mx[:size] = zero
        for j in range(n):
            mj = models[j, p0:p0 + size]
            wj = w[j]
            aw = abs(wj)
            tj = thr[j]
            for q in range(size):
                t = (mj[q] - bs[q]) * wj
                a = abs(t)
                gq = g[q]
                sel = (a >= tj) & (((gq > zero) & (t > zero)) | ((gq <= zero) & (t < zero)))
                acc[q] += t if sel else zero
                cnt[q] += one if sel else zero
                wsum[q] += aw if sel else zero
                mx[q] = max(mx[q], a if sel else zero)
        o = out[p0:p0 + size]
        for q in range(size):
            if g[q] == PROVISIONAL:
                o[q] = np.float32(np.nan) if kept[q] > zero else bs[q]
            else:
                o[q] = bs[q] + lam * _ties_finish(acc[q], cnt[q], wsum[q], mx[q], g[q], merge, weighted)
    return gsum, fallback


@njit(parallel=True, cache=_CACHE)
def _ties_merge_kernel(models, base, w, thr, lam, merge, weighted, majority, nch, out):
    m = models.shape[1]
    gsum = np.zeros(nch, np.int64)
    fallback = np.zeros(nch, np.int64)
    step = (m + nch - 1) // nch
    step = (step + _BLOCK - 1) // _BLOCK * _BLOCK
    for c in prange(nch):
        g, fb = _ties_merge_range(models, base, w, thr, lam, merge, weighted, majority, min(m, c * step), min(m, (c + 1) * step), out)
        gsum[c] = g
        fallback[c] = fb
    return gsum.sum(), fallback.sum()


@njit(cache=_CACHE)
def _ties_fixup(models, base, w, thr, lam, merge, weighted, majority, out):
    """Fill the NaN left by a provisional merge, now that the majority sign is known."""
    n, m = models.shape
    zero = np.float32(0.0)
    for p in range(m):
        if out[p] == out[p]:
            continue
        b = base[p]
        acc = zero
        cnt = zero
        wsum = zero
        mx = zero
        g = np.float32(majority)
        for j in range(n):
            t = (models[j, p] - b) * w[j]
            a = abs(t)
            if a >= thr[j] and ((g > zero and t > zero) or (g <= zero and t < zero)):
                acc += t
                cnt += np.float32(1.0)
                wsum += abs(w[j])
                mx = max(mx, a)
        out[p] = b + lam * _ties_finish(acc, cnt, wsum, mx, g, merge, weighted)


# -- DARE ---------------------------------------------------------------------------

@njit(cache=_CACHE)
def _dare_range(models, base, k0, k1, keep_below, scale, start, stop, out):
    n = models.shape[0]
    for j in range(n):
        a0 = np.uint32(k0[j])
        a1 = np.uint32(k1[j])
        limit = keep_below[j]
        f = scale[j]
        seg = start
        while seg < stop:  # the index's high word is constant within each 2**32-long segment
            end = min(stop, ((seg >> 32) + 1) << 32)
            hi = np.uint32(((np.uint64(seg) >> np.uint64(32)) * np.uint64(GOLDEN32)) & np.uint64(0xFFFFFFFF))
            for p in range(seg, end):
                x = _fmix32(np.uint32(p & 0xFFFFFFFF) ^ a0)
                x = _fmix32(np.uint32(x ^ a1 ^ hi))
                t = (models[j, p] - base[p]) * f
                out[j, p] = t if np.int64(x) < limit else np.float32(0.0)
            seg = end


@njit(parallel=True, cache=_CACHE)
def _dare_kernel(models, base, k0, k1, keep_below, scale, nch, out):
    m = models.shape[1]
    step = (m + nch - 1) // nch
    for c in prange(nch):
        _dare_range(models, base, k0, k1, keep_below, scale, c * step, min(m, (c + 1) * step), out)


@njit(cache=_CACHE)
def _sum_merge_range(tau, w, base, lam, start, stop, out):
    n = tau.shape[0]
    for p in range(start, stop):
        s = np.float32(0.0)
        for j in range(n):
            s += w[j] * tau[j, p]
        out[p] = base[p] + lam * s


@njit(parallel=True, cache=_CACHE)
def _sum_merge_kernel(tau, w, base, lam, nch, out):
    m = tau.shape[1]
    step = (m + nch - 1) // nch
    for c in prange(nch):
        _sum_merge_range(tau, w, base, lam, c * step, min(m, (c + 1) * step), out)


# -- Breadcrumbs ------------------------------------------------------------------

@njit(inline="always", cache=_CACHE)
def _select_inplace(buf, length, k):
    """k-th smallest (0-indexed) of buf[:length]; three-way quickselect, reorders buf."""
    lo = 0
    hi = length - 1
    while True:
        if lo >= hi:
            return buf[lo]
        mid = (lo + hi) >> 1
        a = buf[lo]
        b = buf[mid]
        c = buf[hi]
        if a > b:
            a, b = b, a
        if b > c:
            b = c
            if a > b:
                b = a
        pivot = b
        lt = lo
        gt = hi
        i = lo
        while i <= gt:
            v = buf[i]
            if v < pivot:
                buf[i] = buf[lt]
                buf[lt] = v
                lt += 1
                i += 1
            elif v > pivot:
                buf[i] = buf[gt]
                buf[gt] = v
                gt -= 1
            else:
                i += 1
        if k < lt:
            hi = lt - 1
        elif k > gt:
            lo = gt + 1
        else:
            return pivot


@njit(cache=_CACHE)
def _row_bounds_range(models, base, w, row_len, n_top, n_keep, r0, r1, t_top, t_keep):
    n = models.shape[0]
    inf = np.float32(math.inf)
    buf = np.empty(row_len, np.float32)
    for r in range(r0, r1):
        off = r * row_len
        for j in range(n):
            t_top[j, r] = inf
            t_keep[j, r] = inf
            if n_top[j] <= 0 and n_keep[j] <= 0:
                continue
            for q in range(row_len):
                buf[q] = abs((models[j, off + q] - base[off + q]) * w[j])
            if n_top[j] > 0:
                t_top[j, r] = _select_inplace(buf, row_len, row_len - n_top[j])
            if n_keep[j] > 0:
                t_keep[j, r] = _select_inplace(buf, row_len, row_len - n_top[j] - n_keep[j])


@njit(parallel=True, cache=_CACHE)
def _row_bounds_kernel(models, base, w, row_len, n_top, n_keep, nch, t_top, t_keep):
    rows = models.shape[1] // row_len
    step = (rows + nch - 1) // nch
    for c in prange(nch):
        _row_bounds_range(models, base, w, row_len, n_top, n_keep, c * step, min(rows, (c + 1) * step), t_top, t_keep)


@njit(cache=_CACHE)
def _band_merge_range(models, base, w, row_len, t_top, t_keep, lam, start, stop, out):
    n = models.shape[0]
    for p in range(start, stop):
        r = p // row_len
        b = base[p]
        s = np.float32(0.0)
        for j in range(n):
            t = (models[j, p] - b) * w[j]
            a = abs(t)
            s += t if ((a >= t_keep[j, r]) & (a < t_top[j, r])) else np.float32(0.0)
        out[p] = b + lam * s


@njit(parallel=True, cache=_CACHE)
def _band_merge_kernel(models, base, w, row_len, t_top, t_keep, lam, nch, out):
    m = models.shape[1]
    step = (m + nch - 1) // nch
    for c in prange(nch):
        _band_merge_range(models, base, w, row_len, t_top, t_keep, lam, c * step, min(m, (c + 1) * step), out)


# -- PCB -----------------------------------------------------------------------------

@njit(cache=_CACHE)
def _pcb_scores_range(models, base, lo, hi, start, stop, out):
    n = models.shape[0]
    nf = np.float32(n)
    for p in range(start, stop):
        b = base[p]
        total = np.float32(0.0)
        for j in range(n):
            total += models[j, p] - b
        for j in range(n):
            x = models[j, p] - b
            a = min(max(abs(x), lo[j]), hi[j])
            span = hi[j] - lo[j]
            mm = (a - lo[j]) / span if span > 0 else np.float32(0.0)
            intra = np.float32(math.exp(nf * mm * mm))
            inter = np.float32(math.tanh(x * total))
            s = intra * inter
            if s == 0:
                s = np.float32(0.0)
            out[j, p] = s


@njit(parallel=True, cache=_CACHE)
def _pcb_scores_kernel(models, base, lo, hi, nch, out):
    m = models.shape[1]
    step = (m + nch - 1) // nch
    for c in prange(nch):
        _pcb_scores_range(models, base, lo, hi, c * step, min(m, (c + 1) * step), out)


@njit(cache=_CACHE)
def _pcb_merge_range(models, base, scores, lo, hi, q, smax, lamw, lam, start, stop, out):
    """Blocked like the TIES merge: models outside, parameters inside, branch-free."""
    n = models.shape[0]
    zero = np.float32(0.0)
    num = np.empty(_BLOCK, np.float32)
    den = np.empty(_BLOCK, np.float32)
    for p0 in range(start, stop, _BLOCK):
        size = min(_BLOCK, stop - p0)
        bs = base[p0:p0 + size]
        num[:size] = zero
        den[:size] = zero
        for j in range(n):
            mj = models[j, p0:p0 + size]
            sj = scores[j, p0:p0 + size]
            qj = q[j]
            span = smax[j] - qj
            inv = np.float32(1.0) / span if span > zero else zero
            loj = lo[j]
            hij = hi[j]
            lw = lamw[j]
            for i in range(size):
                wgt = (max(sj[i], qj) - qj) * inv if span > zero else zero
                x = mj[i] - bs[i]
                a = min(max(abs(x), loj), hij)
                clipped = a if x > zero else (-a if x < zero else zero)
                num[i] += lw * wgt * clipped
                den[i] += wgt
        o = out[p0:p0 + size]
        for i in range(size):
            o[i] = bs[i] + lam * (num[i] / max(den[i], np.float32(1e-12)))


@njit(parallel=True, cache=_CACHE)
def _pcb_merge_kernel(models, base, scores, lo, hi, q, smax, lamw, lam, nch, out):
    m = models.shape[1]
    step = (m + nch - 1) // nch
    for c in prange(nch):
        _pcb_merge_range(models, base, scores, lo, hi, q, smax, lamw, lam, c * step, min(m, (c + 1) * step), out)


# -- the backend object ------------------------------------------------------------------

def _prefix_ranges(prefixes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per model, the closed value range spanned by its wanted bins (a cheap pre-filter)."""
    n = prefixes.shape[0]
    lo = np.full(n, np.inf, np.float32)
    hi = np.full(n, -np.inf, np.float32)
    for j in range(n):
        for prefix in prefixes[j]:
            if prefix < 0:
                continue
            a = key_to_float(int(prefix) << 16)
            b = key_to_float((int(prefix) << 16) | 0xFFFF)
            if math.isnan(a) or math.isnan(b):  # bins of NaN keys: no pre-filter
                lo[j], hi[j] = -np.inf, np.inf
                continue
            lo[j] = min(lo[j], a)
            hi[j] = max(hi[j], b)
    return lo, hi


def _f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


class NumbaBackend(Backend):
    """CPU backend: NumPy arrays in, numba kernels for every per-parameter pass."""

    name = "numba"

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    # -- conversion ----------------------------------------------------------------
    @staticmethod
    def _cpu_f32(t: torch.Tensor) -> np.ndarray:
        if t.device.type != "cpu":
            t = t.cpu()
        return np.ascontiguousarray(t.detach().to(torch.float32).numpy())

    def flat(self, models, base, weights) -> Flat:
        n = int(models.shape[0])
        mod = self._cpu_f32(models).reshape(n, -1)
        b = np.zeros(mod.shape[1], np.float32) if base is None else self._cpu_f32(base).reshape(-1)
        if weights is None:
            w = np.ones(n, np.float32)
        elif isinstance(weights, torch.Tensor):
            w = self._cpu_f32(weights).reshape(-1)
        else:
            w = as_f32(weights)
        return Flat(mod, b, w)

    def result(self, out, like: torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(out, dtype=np.float32)).reshape(like.shape)
        return t if like.device.type == "cpu" else t.to(like.device)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    # -- selection -------------------------------------------------------------------
    def hist_hi(self, flat: Flat, mode: int) -> np.ndarray:
        out = np.zeros((flat.n, 65536), np.int64)
        nch = _chunks(flat.m, _HIST_CHUNK, per_thread=1)  # each chunk owns (n, 65536) counts
        if nch == 1:
            part = np.zeros((flat.n, 65536), np.int32)
            _hist_hi_range(flat.models, flat.base, flat.w, mode, 0, flat.m, part)
            out += part
        else:
            _hist_hi_kernel(flat.models, flat.base, flat.w, mode, nch, out)
        return out

    def hist_lo(self, flat: Flat, mode: int, prefixes: np.ndarray) -> np.ndarray:
        prefixes = np.ascontiguousarray(prefixes, dtype=np.int64)
        out = np.zeros((flat.n, prefixes.shape[1], 65536), np.int64)
        lo_val, hi_val = _prefix_ranges(prefixes)
        nch = _chunks(flat.m, _HIST_CHUNK, per_thread=1)  # each chunk owns (n, 65536) counts
        if nch == 1:
            part = np.zeros(out.shape, np.int32)
            _hist_lo_range(flat.models, flat.base, flat.w, mode, prefixes, lo_val, hi_val, 0, flat.m, part)
            out += part
        else:
            _hist_lo_kernel(flat.models, flat.base, flat.w, mode, prefixes, lo_val, hi_val, nch, out)
        return out

    def order_stats(self, flat: Flat, mode: int, plan: RankPlan) -> list[list[float]]:
        if plan.width and flat.m > SAMPLE * 4:
            found = self._bracketed_stats(flat, mode, plan)
            if found is not None:
                return found
        return super().order_stats(flat, mode, plan)

    def _bracketed_stats(self, flat: Flat, mode: int, plan: RankPlan) -> list[list[float]] | None:
        """Exact order statistics in one pass: bracket each rank with a fixed sample, partition what falls inside.

        The sample (every m/SAMPLE-th value) puts each wanted rank inside a
        narrow value range with overwhelming probability; one counting pass
        checks that it did and collects the few values inside. None when a
        bracket missed (the caller then counts exactly with the radix passes).
        """
        n, m, kk = flat.n, flat.m, plan.width
        idx = (np.arange(SAMPLE, dtype=np.int64) * m) // SAMPLE
        sample = flat.models[:, idx]
        if mode == MODE_ABS_DELTA:
            sample = np.abs((sample - flat.base[idx]) * flat.w[:, None])
        lo = np.full((n, kk), np.inf, np.float32)
        hi = np.full((n, kk), -np.inf, np.float32)
        expected = 0
        for j, positions in enumerate(plan.positions):
            cuts = []
            for pos in positions:
                f = pos / m
                r = f * SAMPLE
                delta = 4.0 * math.sqrt(SAMPLE * f * (1 - f)) + 32
                cuts.append((int(r - delta), int(r + delta) + 1))
            wanted = sorted({c for ab in cuts for c in ab if 0 <= c < SAMPLE})
            part = np.partition(sample[j], wanted) if wanted else sample[j]
            for k, (a, b) in enumerate(cuts):
                lo[j, k] = part[a] if a >= 0 else -np.inf
                hi[j, k] = part[b] if b < SAMPLE else np.inf
                expected = max(expected, (min(b, SAMPLE) - max(a, 0)) / SAMPLE * m)
        nch = _chunks(m)
        cap = int(2 * expected / nch) + 4096
        below = np.zeros((nch, n, kk), np.int64)
        inside = np.zeros((nch, n, kk), np.int64)
        buf = np.empty((nch, n, kk, cap + 1), np.float32)
        if nch == 1:
            _bracket_range(flat.models, flat.base, flat.w, mode, lo, hi, 0, m, below[0], inside[0], buf[0])
        else:
            _bracket_kernel(flat.models, flat.base, flat.w, mode, lo, hi, nch, below, inside, buf)
        result = []
        for j, positions in enumerate(plan.positions):
            row = []
            for k, pos in enumerate(positions):
                nb = int(below[:, j, k].sum())
                ni = int(inside[:, j, k].sum())
                if not nb <= pos < nb + ni:
                    return None
                if lo[j, k] == hi[j, k]:
                    row.append(float(lo[j, k]))
                    continue
                if int(inside[:, j, k].max()) > cap:
                    return None
                cand = np.concatenate([buf[c, j, k, :inside[c, j, k]] for c in range(nch)])
                row.append(float(np.partition(cand, pos - nb)[pos - nb]))
            result.append(row)
        return result

    def partition_stats(self, flat: Flat, mode: int, plan: RankPlan) -> list[list[float]]:
        values = np.abs((flat.models - flat.base) * flat.w[:, None]) if mode == MODE_ABS_DELTA else flat.models
        result = []
        for i, positions in enumerate(plan.positions):
            if not positions:
                result.append([])
                continue
            part = np.partition(values[i], positions)
            result.append([float(part[p]) for p in positions])
        return result

    # -- TIES ----------------------------------------------------------------------------
    def ties_sign(self, flat: Flat, lo_thr, hi_thr) -> tuple[int, int]:
        args = (flat.models, flat.base, flat.w, _f32(lo_thr), _f32(hi_thr))
        nch = _chunks(flat.m)
        cs, un = _ties_sign_range(*args, 0, flat.m) if nch == 1 else _ties_sign_kernel(*args, nch)
        return int(cs), int(un)

    def ties_merge(self, flat: Flat, thr, lam: float, merge: int, weighted: bool, majority: int):
        out = np.empty(flat.m, np.float32)
        args = (flat.models, flat.base, flat.w, _f32(thr), np.float32(lam), int(merge), bool(weighted), int(majority))
        nch = _chunks(flat.m)
        g, fb = _ties_merge_range(*args, 0, flat.m, out) if nch == 1 else _ties_merge_kernel(*args, nch, out)
        return out, int(g), int(fb)

    def ties_fixup(self, flat: Flat, thr, lam: float, merge: int, weighted: bool, majority: int, out) -> Any:
        _ties_fixup(flat.models, flat.base, flat.w, _f32(thr), np.float32(lam), int(merge), bool(weighted), int(majority), out)
        return out

    # -- DARE ------------------------------------------------------------------------------
    def dare(self, flat: Flat, k0, k1, keep_below, scale) -> Flat:
        out = np.empty_like(flat.models)
        args = (flat.models, flat.base, np.asarray(k0, np.int64), np.asarray(k1, np.int64),
                np.asarray(keep_below, np.int64), _f32(scale))
        nch = _chunks(flat.m)
        if nch == 1:
            _dare_range(*args, 0, flat.m, out)
        else:
            _dare_kernel(*args, nch, out)
        return Flat(out, np.zeros(flat.m, np.float32), flat.w)

    def sum_merge(self, tau: Flat, base, lam: float):
        out = np.empty(tau.m, np.float32)
        args = (tau.models, tau.w, _f32(base), np.float32(lam))
        nch = _chunks(tau.m)
        if nch == 1:
            _sum_merge_range(*args, 0, tau.m, out)
        else:
            _sum_merge_kernel(*args, nch, out)
        return out

    # -- Breadcrumbs ---------------------------------------------------------------------
    def row_bounds(self, flat: Flat, row_len: int, n_top, n_keep):
        rows = flat.m // row_len if row_len else 0
        t_top = np.empty((flat.n, rows), np.float32)
        t_keep = np.empty((flat.n, rows), np.float32)
        if rows:
            args = (flat.models, flat.base, flat.w, int(row_len), np.asarray(n_top, np.int64), np.asarray(n_keep, np.int64))
            nch = min(rows, _chunks(flat.m))
            if nch == 1:
                _row_bounds_range(*args, 0, rows, t_top, t_keep)
            else:
                _row_bounds_kernel(*args, nch, t_top, t_keep)
        return t_top, t_keep

    def band_merge(self, flat: Flat, row_len: int, t_top, t_keep, lam: float):
        out = np.empty(flat.m, np.float32)
        args = (flat.models, flat.base, flat.w, int(row_len),
                np.ascontiguousarray(t_top, np.float32), np.ascontiguousarray(t_keep, np.float32), np.float32(lam))
        nch = _chunks(flat.m)
        if nch == 1:
            _band_merge_range(*args, 0, flat.m, out)
        else:
            _band_merge_kernel(*args, nch, out)
        return out

    # -- PCB ---------------------------------------------------------------------------------
    def pcb_scores(self, flat: Flat, lo, hi) -> Flat:
        out = np.empty_like(flat.models)
        args = (flat.models, flat.base, _f32(lo), _f32(hi))
        nch = _chunks(flat.m, _PARALLEL_MIN // 8)  # exp and tanh: worth threads sooner
        if nch == 1:
            _pcb_scores_range(*args, 0, flat.m, out)
        else:
            _pcb_scores_kernel(*args, nch, out)
        return Flat(out, np.zeros(flat.m, np.float32), np.ones(flat.n, np.float32))

    def row_max(self, scores: Flat) -> np.ndarray:
        if not scores.m:
            return np.full(scores.n, -np.inf, np.float32)
        return scores.models.max(axis=1)

    def pcb_merge(self, flat: Flat, scores: Flat, lo, hi, q, smax, lamw, lam: float):
        out = np.empty(flat.m, np.float32)
        args = (flat.models, flat.base, scores.models, _f32(lo), _f32(hi), _f32(q), _f32(smax), _f32(lamw), np.float32(lam))
        nch = _chunks(flat.m)
        if nch == 1:
            _pcb_merge_range(*args, 0, flat.m, out)
        else:
            _pcb_merge_kernel(*args, nch, out)
        return out


def warm_up(parallel: bool = True) -> None:
    """Compile (or load from the cache) every kernel once, serial and parallel drivers."""
    be = NumbaBackend()
    rng = np.random.default_rng(0)
    m = 2 * _HIST_CHUNK if parallel else 8
    flat = Flat(rng.standard_normal((2, m)).astype(np.float32), np.zeros(m, np.float32), np.ones(2, np.float32))
    be.hist_hi(flat, 0)
    be.order_stats(flat, 0, RankPlan([[5], [m // 2]]))
    be.hist_lo(flat, 0, np.zeros((2, 1), np.int64))
    be.ties_sign(flat, [0.0, 0.0], [1.0, 1.0])
    out, _, _ = be.ties_merge(flat, [0.0, 0.0], 1.0, 0, True, PROVISIONAL)
    be.ties_fixup(flat, [0.0, 0.0], 1.0, 0, True, 1, out)
    be.dare(flat, [1, 2], [3, 4], [1 << 31, 1 << 31], [2.0, 2.0])
    be.sum_merge(flat, flat.base, 1.0)
    t, k = be.row_bounds(flat, 4, [1, 1], [1, 1])
    be.band_merge(flat, 4, t, k, 1.0)
    s = be.pcb_scores(flat, [0.0, 0.0], [1.0, 1.0])
    be.pcb_merge(flat, s, [0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], 1.0)


__all__ = ["NumbaBackend", "warm_up"]
