"""The same ops as the numba kernels, in plain torch, on any device.

The default on CUDA; also runs on CPU (it is then the eager-torch reference the
numba kernels are measured against). Inputs are moved to the backend's device
(pinned host memory first when that device is CUDA) and results are moved back
to the device the job's tensors live on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import MODE_ABS_DELTA, PROVISIONAL, Backend, Flat
from .keys import GOLDEN32, RankPlan

_HASH_CHUNK = 1 << 22  # elements per slice of the DARE hash (int64 temporaries)


def _f(x: float) -> float:
    """A scalar rounded to float32 first, as the numba kernels see it."""
    return float(np.float32(x))


def _keys_int32(x: torch.Tensor) -> torch.Tensor:
    """Signed int32 keys with the float order: bits for x >= 0, bits ^ 0x7FFFFFFF for x < 0."""
    x = torch.where(x == 0, torch.zeros((), dtype=x.dtype, device=x.device), x)
    bits = x.contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def dare_keep_mask(start: int, count: int, k0: int, k1: int, keep_below: int, device: torch.device) -> torch.Tensor:
    """Boolean mask for element indices start .. start+count of one (seed, model, tensor) stream."""
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = _fmix32((idx & 0xFFFFFFFF) ^ k0)
    x = x ^ k1 ^ _mul32(idx >> 32, GOLDEN32)
    return _fmix32(x) < keep_below


class TorchBackend(Backend):
    """Eager torch on one device ('cpu', 'cuda', 'cuda:1', ...)."""

    name = "torch"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    # -- conversion ----------------------------------------------------------------
    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device != self.device:
            if self.device.type == "cuda" and t.device.type == "cpu":
                t = t.pin_memory().to(self.device, non_blocking=True)
            else:
                t = t.to(self.device)
        return t.to(torch.float32).contiguous()

    def flat(self, models, base, weights) -> Flat:
        n = int(models.shape[0])
        mod = self._dev(models).reshape(n, -1)
        b = torch.zeros(mod.shape[1], dtype=torch.float32, device=self.device) if base is None else self._dev(base).reshape(-1)
        if weights is None:
            w = torch.ones(n, dtype=torch.float32, device=self.device)
        elif isinstance(weights, torch.Tensor):
            w = self._dev(weights).reshape(-1)
        else:
            w = torch.tensor([float(v) for v in weights], dtype=torch.float32, device=self.device)
        return Flat(mod, b, w)

    def result(self, out, like: torch.Tensor) -> torch.Tensor:
        return out.reshape(like.shape).to(like.device)

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().cpu().numpy()

    def _vec(self, values) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float32), device=self.device)

    @staticmethod
    def _values(flat: Flat, mode: int) -> torch.Tensor:
        if mode == MODE_ABS_DELTA:
            return ((flat.models - flat.base) * flat.w[:, None]).abs()
        return flat.models

    # -- selection -------------------------------------------------------------------
    def hist_hi(self, flat: Flat, mode: int) -> np.ndarray:
        keys = _keys_int32(self._values(flat, mode))
        hi = (keys >> 16) + 32768
        out = np.zeros((flat.n, 65536), np.int64)
        for i in range(flat.n):
            out[i] = torch.bincount(hi[i].to(torch.int64), minlength=65536).cpu().numpy()
        return out

    def hist_lo(self, flat: Flat, mode: int, prefixes: np.ndarray) -> np.ndarray:
        keys = _keys_int32(self._values(flat, mode))
        hi = (keys >> 16) + 32768
        lo = keys & 0xFFFF
        out = np.zeros((flat.n, prefixes.shape[1], 65536), np.int64)
        for i in range(flat.n):
            for k in range(prefixes.shape[1]):
                if prefixes[i, k] < 0:
                    continue
                sel = lo[i][hi[i] == int(prefixes[i, k])]
                out[i, k] = torch.bincount(sel.to(torch.int64), minlength=65536).cpu().numpy()
        return out

    def partition_stats(self, flat: Flat, mode: int, plan: RankPlan) -> list[list[float]]:
        values = self._values(flat, mode)
        result = []
        for i, positions in enumerate(plan.positions):
            result.append([float(torch.kthvalue(values[i], p + 1).values) for p in positions])
        return result

    def order_stats(self, flat: Flat, mode: int, plan: RankPlan) -> list[list[float]]:
        # kthvalue is exact and fast on every device; the counting passes are for streams
        return self.partition_stats(flat, mode, plan)

    # -- TIES ----------------------------------------------------------------------------
    def _trimmed(self, flat: Flat, thr) -> torch.Tensor:
        t = (flat.models - flat.base) * flat.w[:, None]
        return torch.where(t.abs() >= self._vec(thr)[:, None], t, torch.zeros((), device=self.device))

    @staticmethod
    def _sum_in_order(x: torch.Tensor) -> torch.Tensor:
        s = x[0].clone()
        for j in range(1, x.shape[0]):
            s += x[j]
        return s

    def ties_sign(self, flat: Flat, lo_thr, hi_thr) -> tuple[int, int]:
        t = (flat.models - flat.base) * flat.w[:, None]
        a = t.abs()
        hi = self._vec(hi_thr)[:, None]
        kept = torch.where(a >= hi, t, torch.zeros((), device=self.device))
        unsure = ((a < hi) & (a >= self._vec(lo_thr)[:, None]) & (t != 0)).any(dim=0)
        g = torch.sign(self._sum_in_order(kept))
        return int(g[~unsure].sum()), int(unsure.sum())

    def ties_merge(self, flat: Flat, thr, lam: float, merge: int, weighted: bool, majority: int):
        trimmed = self._trimmed(flat, thr)
        s = self._sum_in_order(trimmed)
        g = torch.sign(s)
        gsum = int(g.sum())
        open_sign = (g == 0) & (trimmed != 0).any(dim=0)
        fallback = int(open_sign.sum())
        if majority == PROVISIONAL:  # the whole tensor's Σγ is already known here: no second step needed
            majority = int(np.sign(gsum))
        g = torch.where(g == 0, torch.full_like(g, float(majority)), g)
        selected = torch.where(g[None] > 0, trimmed > 0, trimmed < 0)
        chosen = torch.where(selected, trimmed, torch.zeros((), device=self.device))
        if merge == 0:
            acc = self._sum_in_order(chosen)
            if weighted:
                weights = torch.where(selected, flat.w.abs()[:, None], torch.zeros((), device=self.device))
                denom = self._sum_in_order(weights)
            else:
                denom = selected.sum(dim=0).to(torch.float32)
            delta = torch.where(denom > 0, acc / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(acc))
        elif merge == 1:
            delta = self._sum_in_order(chosen)
        else:
            delta = chosen.abs().amax(dim=0) * g
        return flat.base + delta * _f(lam), gsum, fallback

    def ties_fixup(self, flat: Flat, thr, lam: float, merge: int, weighted: bool, majority: int, out):
        # ties_merge above resolves a provisional majority itself, so nothing is left open
        return out

    # -- DARE ------------------------------------------------------------------------------
    def dare(self, flat: Flat, k0, k1, keep_below, scale) -> Flat:
        out = torch.empty_like(flat.models)
        f = self._vec(scale)
        for j in range(flat.n):
            for start in range(0, flat.m, _HASH_CHUNK):
                count = min(_HASH_CHUNK, flat.m - start)
                keep = dare_keep_mask(start, count, int(k0[j]), int(k1[j]), int(keep_below[j]), self.device)
                sl = slice(start, start + count)
                delta = (flat.models[j, sl] - flat.base[sl]) * f[j]
                out[j, sl] = torch.where(keep, delta, torch.zeros((), device=self.device))
        zeros = torch.zeros(flat.m, dtype=torch.float32, device=self.device)
        return Flat(out, zeros, flat.w)

    def sum_merge(self, tau: Flat, base, lam: float):
        return base + self._sum_in_order(tau.w[:, None] * tau.models) * _f(lam)

    # -- Breadcrumbs ---------------------------------------------------------------------
    def row_bounds(self, flat: Flat, row_len: int, n_top, n_keep):
        rows = flat.m // row_len if row_len else 0
        t_top = np.full((flat.n, rows), np.inf, np.float32)
        t_keep = np.full((flat.n, rows), np.inf, np.float32)
        if rows == 0:
            return t_top, t_keep
        a = ((flat.models - flat.base) * flat.w[:, None]).abs().reshape(flat.n, rows, row_len)
        for j in range(flat.n):
            top, keep = int(n_top[j]), int(n_keep[j])
            if top > 0:
                t_top[j] = self.to_numpy(torch.kthvalue(a[j], row_len - top + 1, dim=1).values)
            if keep > 0:
                t_keep[j] = self.to_numpy(torch.kthvalue(a[j], row_len - top - keep + 1, dim=1).values)
        return t_top, t_keep

    def band_merge(self, flat: Flat, row_len: int, t_top, t_keep, lam: float):
        rows = flat.m // row_len
        t = ((flat.models - flat.base) * flat.w[:, None]).reshape(flat.n, rows, row_len)
        a = t.abs()
        top = torch.as_tensor(np.asarray(t_top, np.float32), device=self.device)[:, :, None]
        keep = torch.as_tensor(np.asarray(t_keep, np.float32), device=self.device)[:, :, None]
        band = torch.where((a >= keep) & (a < top), t, torch.zeros((), device=self.device)).reshape(flat.n, -1)
        return flat.base + self._sum_in_order(band) * _f(lam)

    # -- PCB ---------------------------------------------------------------------------------
    def _clipped_abs(self, x: torch.Tensor, lo, hi) -> torch.Tensor:
        lo_t = self._vec(lo)[:, None]
        hi_t = self._vec(hi)[:, None]
        return torch.minimum(torch.maximum(x.abs(), lo_t), hi_t)

    def pcb_scores(self, flat: Flat, lo, hi) -> Flat:
        x = flat.models - flat.base
        total = self._sum_in_order(x)
        a = self._clipped_abs(x, lo, hi)
        span = (self._vec(hi) - self._vec(lo))[:, None]
        mm = torch.where(span > 0, (a - self._vec(lo)[:, None]) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros((), device=self.device))
        s = torch.exp(float(flat.n) * mm * mm) * torch.tanh(x * total[None])
        s = torch.where(s == 0, torch.zeros((), device=self.device), s)
        zeros = torch.zeros(flat.m, dtype=torch.float32, device=self.device)
        return Flat(s, zeros, torch.ones(flat.n, dtype=torch.float32, device=self.device))

    def row_max(self, scores: Flat) -> np.ndarray:
        if not scores.m:
            return np.full(scores.n, -np.inf, np.float32)
        return self.to_numpy(scores.models.amax(dim=1))

    def pcb_merge(self, flat: Flat, scores: Flat, lo, hi, q, smax, lamw, lam: float):
        q_t = self._vec(q)[:, None]
        span = self._vec(smax)[:, None] - q_t
        inv = torch.where(span > 0, 1.0 / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
        wgt = (torch.maximum(scores.models, q_t) - q_t) * inv  # times the reciprocal, as the numba kernel
        x = flat.models - flat.base
        clipped = torch.sign(x) * self._clipped_abs(x, lo, hi)
        num = self._sum_in_order(self._vec(lamw)[:, None] * wgt * clipped)
        den = self._sum_in_order(wgt)
        return flat.base + (num / torch.clamp(den, min=1e-12)) * _f(lam)


__all__ = ["TorchBackend", "dare_keep_mask"]
