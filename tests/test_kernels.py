"""Kernel backends: order keys, exact selection, numba/torch agreement, DARE's generator, backend choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.errors import RecipeError
from merging.kernels import get_backend
from merging.kernels.base import MERGE_MAX, MERGE_MEAN, MERGE_SUM, MODE_ABS_DELTA, MODE_RAW, SMALL_SELECT, Flat
from merging.kernels.keys import RankPlan, dare_hash, float_to_key, key_to_float, keep_threshold
from merging.kernels.select import RadixSelect

BACKENDS = ["numba", "torch"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def flat_for(backend, models: np.ndarray, base: np.ndarray, w) -> Flat:
    return backend.flat(torch.from_numpy(models), torch.from_numpy(base), list(w))


def grid(rng, shape, lo=-40, hi=40, scale=64.0) -> np.ndarray:
    """Values on a coarse grid: exact in float32, with many ties."""
    return (rng.integers(lo, hi, shape) / scale).astype(np.float32)


# -- keys ------------------------------------------------------------------------------

def test_keys_preserve_float_order_and_round_trip():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(2000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 2000),
        np.array([0.0, -0.0, 1e-45, -1e-45, np.inf, -np.inf, 3.4e38, -3.4e38], np.float32),
    ]).astype(np.float32)
    keys = float_to_key(x)
    order_by_key = np.argsort(keys, kind="stable")
    assert np.all(np.diff(x[order_by_key].astype(np.float64)) >= 0)
    assert float_to_key(np.array([-0.0], np.float32))[0] == float_to_key(np.array([0.0], np.float32))[0]
    for v, k in zip(x[:200], keys[:200]):
        assert key_to_float(int(k)) == (0.0 if v == 0 else float(v))


# -- selection -------------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", BACKENDS)
def test_radix_select_over_chunks_is_exact(backend_name):
    be = get_backend(backend_name, "cpu")
    rng = np.random.default_rng(1)
    n = 3
    chunks = [(grid(rng, (n, m)), grid(rng, (m,))) for m in (1, 700, 5000, 123)]
    w = [1.0, -2.0, 0.5]
    allv = np.concatenate([np.abs((mo - b) * np.array(w, np.float32)[:, None]) for mo, b in chunks], axis=1)
    total = allv.shape[1]
    positions = [[0, total - 1], [total // 2], [17, total - 18]]
    sel = RadixSelect(n, MODE_ABS_DELTA)
    for mo, b in chunks:
        sel.add_hi(be, flat_for(be, mo, b, w))
    assert sel.total == total
    sel.set_plan(RankPlan(positions))
    for mo, b in chunks:
        sel.add_lo(be, flat_for(be, mo, b, w))
    got = sel.values()
    for i in range(n):
        ref = np.sort(allv[i].astype(np.float64))
        assert got[i] == [float(ref[p]) for p in positions[i]]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_order_stats_signed_values_small_and_large(backend_name):
    be = get_backend(backend_name, "cpu")
    rng = np.random.default_rng(2)
    for m in (50, SMALL_SELECT + 1000):
        scores = rng.standard_normal((2, m)).astype(np.float32)
        scores[:, ::7] = 0.0
        scores[0, ::11] = -0.0
        scores[1, :100] = 2.5  # a block of ties
        flat = flat_for(be, scores, np.zeros(m, np.float32), [1.0, 1.0])
        positions = [[0, m // 3, m - 1], [m - 50, m - 1]]
        got = be.order_stats(flat, MODE_RAW, RankPlan(positions))
        for i in range(2):
            ref = np.sort(scores[i].astype(np.float64))
            assert got[i] == [float(ref[p]) for p in positions[i]]


def test_bracketed_selection_and_its_fallback(monkeypatch):
    """Tensor scope on the numba backend brackets each rank from a fixed sample, then partitions."""
    from merging.kernels import numba_backend as nb

    be = get_backend("numba", "cpu")
    rng = np.random.default_rng(7)
    m = 4 * nb.SAMPLE + 5000
    models = grid(rng, (2, m), -300, 300)
    models[1, : m // 3] = 0.0  # a third of ties at zero
    base = np.zeros(m, np.float32)
    plan = RankPlan([[0, m // 2, m - 1], [m // 4, m - 10]])
    for mode in (MODE_ABS_DELTA, MODE_RAW):
        flat = flat_for(be, models, base, [1.0, -2.0])
        found = be._bracketed_stats(flat, mode, plan)
        assert found is not None
        values = np.abs(models * np.array([[1.0], [-2.0]], np.float32)) if mode == MODE_ABS_DELTA else models
        for i in range(2):
            ref = np.sort(values[i].astype(np.float64))
            assert found[i] == [float(ref[p]) for p in plan.positions[i]]
    # a sample that lies (the sampled positions hold zeros, the rest is large): the bracket
    # misses, and order_stats falls back to the exact counting passes
    tricky = rng.uniform(1, 2, (1, m)).astype(np.float32)
    idx = (np.arange(nb.SAMPLE, dtype=np.int64) * m) // nb.SAMPLE
    tricky[0, idx] = 0.0
    flat = flat_for(be, tricky, base, [1.0])
    wanted = RankPlan([[m // 2]])
    assert be._bracketed_stats(flat, MODE_ABS_DELTA, wanted) is None
    assert be.order_stats(flat, MODE_ABS_DELTA, wanted) == [[float(np.sort(tricky[0])[m // 2])]]


# -- numba and torch agree -----------------------------------------------------------------

@pytest.fixture(scope="module")
def random_flat_inputs():
    rng = np.random.default_rng(3)
    n, m = 4, 3000
    base = grid(rng, (m,))
    models = base + grid(rng, (n, m), -8, 8)
    models[1, :500] = base[:500]  # an unchanged stretch in one model
    return models, base, [1.0, -1.0, 0.5, 2.0]


@pytest.mark.parametrize("merge", [MERGE_MEAN, MERGE_SUM, MERGE_MAX])
@pytest.mark.parametrize("weighted", [True, False])
def test_ties_merge_kernels_agree(random_flat_inputs, merge, weighted):
    models, base, w = random_flat_inputs
    thr = [0.05, 0.0, 0.1, np.inf]
    outs = []
    for name in BACKENDS:
        be = get_backend(name, "cpu")
        flat = flat_for(be, models, base, w)
        out, g, fb = be.ties_merge(flat, thr, 0.7, merge, weighted, -1)
        outs.append((be.to_numpy(out), g, fb, be.ties_sign(flat, thr, thr)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert outs[0][1:] == outs[1][1:]
    assert outs[0][3] == (outs[0][1], 0)


def test_band_and_pcb_kernels_agree(random_flat_inputs):
    models, base, w = random_flat_inputs
    res = {}
    for name in BACKENDS:
        be = get_backend(name, "cpu")
        flat = flat_for(be, models, base, w)
        top, keep = be.row_bounds(flat, 100, [3, 0, 1, 5], [10, 20, 0, 95])
        band = be.to_numpy(be.band_merge(flat, 100, top, keep, 0.3))
        s = be.pcb_scores(flat_for(be, models, base, [1.0] * 4), [0.0, 0.01, 0.02, 0.0], [0.1, 0.1, 0.08, 0.12])
        pcb = be.to_numpy(be.pcb_merge(flat, s, [0.0, 0.01, 0.02, 0.0], [0.1, 0.1, 0.08, 0.12], [0.0, 0.001, 0.0, 0.002], be.row_max(s), [1.0, 0.5, 1.0, 2.0], 1.2))
        res[name] = (top, keep, band, be.to_numpy(s.models), pcb)
    a, b = res["numba"], res["torch"]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    np.testing.assert_allclose(a[3], b[3], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a[4], b[4], rtol=1e-6, atol=1e-7)


def test_parallel_and_serial_drivers_agree():
    """Large inputs run on chunks in threads; the results equal the serial ones and torch's."""
    import numba

    from merging.kernels import numba_backend as nb

    rng = np.random.default_rng(5)
    n, m = 2, 600_000
    base = grid(rng, (m,))
    models = base + grid(rng, (n, m), -8, 8)
    w = [1.0, -0.5]
    be, tb = get_backend("numba", "cpu"), get_backend("torch", "cpu")
    assert nb._chunks(m) > 1 and nb._chunks(m, nb._HIST_CHUNK) > 1

    def everything(backend):
        flat = flat_for(backend, models, base, w)
        hist = backend.hist_hi(flat, MODE_ABS_DELTA)
        lo = backend.hist_lo(flat, MODE_ABS_DELTA, np.argmax(hist, axis=1)[:, None])
        out, g, fb = backend.ties_merge(flat, [0.05, 0.1], 1.0, MERGE_MEAN, True, 1)
        sign = backend.ties_sign(flat, [0.05, 0.1], [0.08, 0.1])
        tau = backend.dare(flat, [7, 8], [9, 10], [keep_threshold(0.4)] * 2, [2.5, 2.5])
        dl = backend.sum_merge(tau, flat.base, 0.5)
        top, keep = backend.row_bounds(flat, 600, [6, 0], [60, 30])
        band = backend.band_merge(flat, 600, top, keep, 1.0)
        s = backend.pcb_scores(flat, [0.0, 0.01], [0.1, 0.1])
        pcb = backend.pcb_merge(flat, s, [0.0, 0.01], [0.1, 0.1], [0.0, 0.0], backend.row_max(s), [1.0, 1.0], 1.0)
        return [hist, lo, backend.to_numpy(out), g, fb, sign, backend.to_numpy(tau.models), backend.to_numpy(dl),
                top, keep, backend.to_numpy(band), backend.to_numpy(s.models), backend.to_numpy(pcb)]

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = everything(be)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = everything(be)
    finally:
        numba.set_num_threads(before)
    ref = everything(tb)
    # the same numbers in a serial run (chunks of the whole range)
    flat = flat_for(be, models, base, w)
    serial = np.zeros((n, 65536), np.int32)
    nb._hist_hi_range(flat.models, flat.base, flat.w, MODE_ABS_DELTA, 0, m, serial)
    np.testing.assert_array_equal(one[0], serial)
    np.testing.assert_array_equal(one[0].sum(axis=1), [m, m])
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    for i, (a, b) in enumerate(zip(one, ref)):
        if i in (11, 12):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(a, b)


# -- DARE's generator ------------------------------------------------------------------------

def _python_hash(j: int, k0: int, k1: int) -> int:
    """The documented generator, written out with Python integers."""
    def fmix(x: int) -> int:
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        return x ^ (x >> 16)

    x = fmix((j & 0xFFFFFFFF) ^ k0)
    x ^= k1 ^ (((j >> 32) * 0x9E3779B9) & 0xFFFFFFFF)
    return fmix(x)


def test_dare_hash_matches_its_definition():
    idx = np.array([0, 1, 2, 12345, 2**32 - 1, 2**32, 2**40 + 7], np.int64)
    got = dare_hash(idx, 0xDEADBEEF, 0x01234567)
    assert [int(v) for v in got] == [_python_hash(int(j), 0xDEADBEEF, 0x01234567) for j in idx]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_dare_kernel_mask_equals_reference_hash(backend_name):
    be = get_backend(backend_name, "cpu")
    rng = np.random.default_rng(4)
    m = 20000
    models = rng.uniform(1, 2, (2, m)).astype(np.float32)
    base = np.zeros(m, np.float32)
    keys = [(11, 22), (33, 44)]
    below = [keep_threshold(0.3), keep_threshold(0.75)]
    tau = be.dare(flat_for(be, models, base, [1.0, 1.0]), [k[0] for k in keys], [k[1] for k in keys], below, [1.0, 1.0])
    got = be.to_numpy(tau.models) != 0
    for i in range(2):
        ref = dare_hash(np.arange(m), *keys[i]) < below[i]
        np.testing.assert_array_equal(got[i], ref)


def test_keep_threshold_extremes():
    assert keep_threshold(1.0) == 2**32
    assert keep_threshold(0.0) == 0
    assert keep_threshold(0.5) == 2**31


# -- choosing a backend ----------------------------------------------------------------------

def test_get_backend_choices():
    assert get_backend("auto", "cpu").name == "numba"
    assert get_backend("numba", "cpu").name == "numba"
    t = get_backend("torch", "cpu")
    assert t.name == "torch" and t.device.type == "cpu"
    auto = get_backend()
    assert auto.name == ("torch" if torch.cuda.is_available() else "numba")
    with pytest.raises(RecipeError, match="backend"):
        get_backend("jax", "cpu")
    with pytest.raises(RecipeError, match="device"):
        get_backend("auto", "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="no CUDA"):
            get_backend("torch", "cuda")
    else:
        with pytest.raises(RecipeError, match="CPU only"):
            get_backend("numba", "cuda")


@pytest.mark.cuda
@cuda
def test_cuda_kernels_match_numba(random_flat_inputs):
    models, base, w = random_flat_inputs
    cpu, gpu = get_backend("numba", "cpu"), get_backend("torch", "cuda")
    out = {}
    for be in (cpu, gpu):
        flat = flat_for(be, models, base, w)
        thr = [0.05, 0.0, 0.1, np.inf]
        ties, g, fb = be.ties_merge(flat, thr, 0.7, MERGE_MEAN, True, 1)
        tau = be.dare(flat, [1, 2, 3, 4], [5, 6, 7, 8], [keep_threshold(0.3)] * 4, [1 / 0.3] * 4)
        stats = be.order_stats(flat, MODE_ABS_DELTA, RankPlan([[5], [100], [2999], [0]]))
        out[be.name] = (be.to_numpy(ties), g, fb, be.to_numpy(tau.models), stats)
    a, b = out["numba"], out["torch"]
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-7)
    assert a[1:3] == b[1:3]
    np.testing.assert_array_equal(a[3] != 0, b[3] != 0)
    assert a[4] == b[4]


class _Sparse:
    """A stand-in array for indices past 2**32 (the kernel's Python body reads and writes through it)."""

    def __init__(self, shape, value=1.0):
        self.shape, self.value, self.cells = shape, value, {}

    def __getitem__(self, key):
        return self.cells.get(key, self.value)

    def __setitem__(self, key, value):
        self.cells[key] = value


def test_numba_dare_mask_past_two_to_the_32_equals_reference_hash():
    """Indices whose high word changes inside one range, run through the kernel's own Python body."""
    from merging.kernels.numba_backend import _dare_range

    start, stop = 2**32 - 5, 2**32 + 5
    models, out = _Sparse((2, stop), np.float32(2.0)), _Sparse((2, stop))
    base = _Sparse((stop,), np.float32(1.0))
    k0, k1 = np.array([11, 33], np.int64), np.array([22, 44], np.int64)
    below = np.array([keep_threshold(0.5), keep_threshold(0.5)], np.int64)
    _dare_range.py_func(models, base, k0, k1, below, np.ones(2, np.float32), start, stop, out)
    idx = np.arange(start, stop, dtype=np.int64)
    for j in range(2):
        got = np.array([out[j, int(p)] != 0 for p in idx])
        np.testing.assert_array_equal(got, dare_hash(idx, int(k0[j]), int(k1[j])) < below[j])
    assert {bool(out[0, int(p)] != 0) for p in idx} == {True, False}  # both outcomes occur
