"""TIES, DARE, Breadcrumbs and PCB against slow float64 NumPy references, on both backends and both scopes.

Task vectors are drawn on a coarse grid (multiples of 1/64), so they are exact
in float32 and float64 alike and full of ties at every threshold; the only
rounding left is in the final means and PCB's exp/tanh.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from merging.errors import RecipeError
from merging.kernels import get_backend
from merging.methods import TensorJob, get_method

BACKENDS = ["numba", "torch"]
SHAPES = {"a.weight": (12, 40), "a.bias": (40,), "b.scale": (), "c.conv": (4, 3, 5, 5), "d.big": (60, 70)}


@pytest.fixture(autouse=True)
def _small_partition_limit(monkeypatch):
    """Tensors above 2048 entries take the counting (radix) path in tensor scope too."""
    monkeypatch.setattr("merging.kernels.base.SMALL_SELECT", 2048)


# -- data and driving ----------------------------------------------------------------------

def make_family(n: int, seed: int, shapes=SHAPES, spread: int = 6, zero_models=(), scale: float = 64.0):
    rng = np.random.default_rng(seed)
    base, models = {}, {}
    for name, shape in shapes.items():
        b = (rng.integers(-60, 60, shape) / scale).astype(np.float32)
        d = (rng.integers(-spread, spread + 1, (n, *shape)) / scale).astype(np.float32)
        for i in zero_models:
            d[i] = 0
        base[name] = np.asarray(b, np.float32)
        models[name] = np.asarray(b[None] + d, np.float32)
    return base, models


def full_params(method, **over):
    params = {p.name: p.default for p in method.params}
    params.update(over)
    return params


def run(method_name, base, models, backend_name="numba", params=None, per_tensor=None, seed=0, model_ids=None, order=None):
    """Drive a method as the executor does: prepare over a stream (global scope), then merge each tensor."""
    method = get_method(method_name)
    backend = get_backend(backend_name, "cpu")
    top = full_params(method, **(params or {}))
    names = order or sorted(base)

    def job_params(name):
        p = dict(top)
        if per_tensor:
            p.update(per_tensor(name) or {})
        return p

    def stream():
        for name in names:
            n = models[name].shape[0]
            yield TensorJob(
                name=name,
                base=torch.from_numpy(np.array(base[name], dtype=np.float32)),
                models=torch.from_numpy(np.array(models[name], dtype=np.float32)),
                weights=torch.ones(n),
                params=job_params(name),
                seed=seed,
                backend=backend,
                model_ids=tuple(model_ids) if model_ids is not None else tuple(range(n)),
            )

    stats = method.prepare(top, stream) if method.needs_prepare(top) else None
    out = {}
    for job in stream():
        got = method.merge(replace(job, stats=stats))
        assert got.dtype == torch.float32 and tuple(got.shape) == tuple(job.base.shape)
        out[job.name] = got.numpy().astype(np.float64)
    return out, stats


def task_vectors(base, models, names, w=None):
    tv = {}
    for k in names:
        t = models[k].astype(np.float64) - base[k].astype(np.float64)[None]
        if w is not None:
            t = t * np.asarray(w, np.float64).reshape((-1,) + (1,) * (t.ndim - 1))
        tv[k] = t.reshape(t.shape[0], -1)
    return tv


def per_scope(tv: dict, scope: str, fn):
    """Apply fn to (n, D) blocks: each tensor (tensor scope) or all tensors concatenated (global)."""
    names = sorted(tv)
    if scope == "tensor":
        return {k: fn(tv[k]) for k in names}
    cat = np.concatenate([tv[k] for k in names], axis=1)
    res = fn(cat)
    out, start = {}, 0
    for k in names:
        d = tv[k].shape[1]
        out[k] = res[..., start:start + d]
        start += d
    return out


def assert_close(got: dict, want: dict, base: dict, rtol=1e-6, atol=1e-6):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k].reshape(base[k].shape), rtol=rtol, atol=atol, err_msg=k)


# -- TIES reference (the official code's semantics, float64) ---------------------------------------

def ref_trim(x: np.ndarray, densities, rule="official") -> np.ndarray:
    out = np.zeros_like(x)
    n, d = x.shape
    for i in range(n):
        k = densities[i]
        m = int(d * k)
        a = np.abs(x[i])
        if k <= 0 or d == 0:
            continue
        if m >= d:
            out[i] = x[i]
            continue
        srt = np.sort(a)
        if rule == "official":
            t = srt[d - m - 1]  # torch.kthvalue(a, d - m): the (m+1)-th largest
        else:
            if m == 0:
                continue
            t = srt[d - m]
        out[i] = np.where(a >= t, x[i], 0.0)
    return out


def ref_elect_merge(trimmed: np.ndarray, w, merge="mean", normalize=True) -> np.ndarray:
    g = np.sign(trimmed.sum(0))
    majority = np.sign(g.sum())
    g[g == 0] = majority
    sel = np.where(g[None] > 0, trimmed > 0, trimmed < 0)
    chosen = trimmed * sel
    if merge == "sum":
        return chosen.sum(0)
    if merge == "max":
        return np.abs(chosen).max(0) * g
    if normalize:
        denom = (np.abs(np.asarray(w, np.float64))[:, None] * sel).sum(0)
    else:
        denom = sel.sum(0).astype(np.float64)
    return np.where(denom > 0, chosen.sum(0) / np.where(denom > 0, denom, 1), 0.0)


def ref_ties(base, models, densities, w=None, lam=1.0, scope="global", rule="official", merge="mean", normalize=True):
    n = next(iter(models.values())).shape[0]
    w = [1.0] * n if w is None else w
    tv = task_vectors(base, models, base, w)
    delta = per_scope(tv, scope, lambda x: ref_elect_merge(ref_trim(x, densities, rule), w, merge, normalize))
    return {k: base[k].astype(np.float64).reshape(-1) + lam * delta[k] for k in base}


# -- TIES -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("rule", ["official", "exact"])
def test_ties_matches_reference(backend_name, scope, rule):
    base, models = make_family(3, seed=1)
    dens = [0.2, 0.5, 0.05]
    got, stats = run("ties", base, models, backend_name, {"density": dens, "scope": scope, "trim_rule": rule, "lambda": 0.8})
    assert_close(got, ref_ties(base, models, dens, lam=0.8, scope=scope, rule=rule), base)
    if scope == "global":
        assert stats.total == sum(int(np.prod(s)) for s in SHAPES.values())
        assert stats.passes in (2, 3)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_ties_tensor_scope_on_a_large_tensor(backend_name):
    # above 4 x the bracketing sample: the numba backend's one-pass bracketed selection
    base, models = make_family(3, seed=30, shapes={"big": (300, 300)}, spread=40)
    got, _ = run("ties", base, models, backend_name, {"scope": "tensor", "density": 0.15})
    assert_close(got, ref_ties(base, models, [0.15] * 3, scope="tensor"), base)


def test_ties_official_rule_keeps_m_plus_one_when_distinct():
    # one model, distinct magnitudes: density 0.2 of 10 entries keeps 3 (m + 1), exact keeps 2
    base = {"t": np.zeros(10, np.float32)}
    models = {"t": np.array([[0.1, -0.9, 0.3, 0.7, -0.2, 0.5, 0.05, -0.6, 0.8, 0.4]], np.float32)}
    for rule, kept in (("official", {1, 8, 3}), ("exact", {1, 8})):
        for scope in ("tensor", "global"):
            got, _ = run("ties", base, models, params={"density": 0.2, "trim_rule": rule, "scope": scope})
            assert set(np.flatnonzero(got["t"])) == kept


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_negative_weights_merge_functions_and_ties(backend_name, scope):
    base, models = make_family(4, seed=2, spread=2)  # 5 distinct values: ties everywhere
    w = [1.0, -1.0, 0.5, 2.0]
    for merge, normalize in (("mean", True), ("mean", False), ("sum", True), ("max", True)):
        params = {"density": 0.3, "scope": scope, "weight": w, "merge": merge, "normalize": normalize}
        got, _ = run("ties", base, models, backend_name, params)
        assert_close(got, ref_ties(base, models, [0.3] * 4, w, scope=scope, merge=merge, normalize=normalize), base)


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_all_zero_and_single_model(scope):
    base, models = make_family(3, seed=3, zero_models=(0, 1, 2))
    got, _ = run("ties", base, models, params={"scope": scope})
    for k in base:
        np.testing.assert_array_equal(got[k], base[k].reshape(base[k].shape).astype(np.float64))
    base, models = make_family(3, seed=4, zero_models=(1,))  # one unchanged model takes no part
    got, _ = run("ties", base, models, params={"scope": scope, "density": 0.3})
    assert_close(got, ref_ties(base, models, [0.3] * 3, scope=scope), base)
    base, models = make_family(1, seed=5)
    got, _ = run("ties", base, models, params={"scope": scope, "density": 1.0})
    for k in base:  # k = 1, one model, λ = 1 returns θ₁
        np.testing.assert_allclose(got[k], models[k][0].astype(np.float64), atol=1e-7)


def test_ties_zero_sum_uses_majority_sign_of_the_scope():
    # columns: (+1,-1) sums to zero -> majority sign; the other columns vote negative overall
    base = {"a": np.zeros(4, np.float32), "b": np.zeros(3, np.float32)}
    models = {
        "a": np.array([[0.5, -0.25, -0.5, 0.0], [-0.5, -0.25, -0.5, 0.0]], np.float32),
        "b": np.array([[0.25, 0.0, -0.75], [0.25, 0.0, 0.25]], np.float32),
    }
    # global: γ = (0, -1, -1, 0 | +1, 0, -1) -> Σγ = -2 -> column a[0] takes the negative entry -0.5
    got, stats = run("ties", base, models, params={"density": 1.0, "scope": "global"})
    assert stats.majority == -1 and stats.passes == 1 and stats.total == 7
    np.testing.assert_allclose(got["a"], [-0.5, -0.25, -0.5, 0.0])
    np.testing.assert_allclose(got["b"], [0.25, 0.0, -0.75])
    # tensor scope: tensor a votes negative (same result); tensor b alone has no zero-sum column
    got, _ = run("ties", base, models, params={"density": 1.0, "scope": "tensor"})
    np.testing.assert_allclose(got["a"], [-0.5, -0.25, -0.5, 0.0])
    assert_close(got, ref_ties(base, models, [1.0, 1.0], scope="tensor"), base)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_ties_global_third_pass_when_the_bin_cannot_decide_the_majority(backend_name):
    # opposite twins: every column sums to exactly 0, so Σγ = 0 and the threshold bin
    # leaves it open; the exact third pass finds majority 0 and the negative entries win
    rng = np.random.default_rng(6)
    v = (rng.permutation(3000) + 1).astype(np.float32) / 4096
    base = {"t": np.zeros(3000, np.float32)}
    models = {"t": np.stack([v, -v]).astype(np.float32)}
    got, stats = run("ties", base, models, backend_name, {"density": 0.3, "scope": "global"})
    assert stats.passes == 3 and stats.majority == 0
    assert_close(got, ref_ties(base, models, [0.3, 0.3], scope="global"), base)
    kept = v >= np.sort(v)[3000 - 900 - 1]
    np.testing.assert_array_equal(got["t"], np.where(kept, -v, 0).astype(np.float64))


def test_ties_per_tensor_overrides():
    base, models = make_family(3, seed=7)
    def per_tensor(name):
        return {"density": 0.6, "lambda": 0.5} if name.startswith("a.") else {"density": 0.1, "lambda": 1.5}
    got, _ = run("ties", base, models, params={"scope": "tensor"}, per_tensor=per_tensor)
    for k in base:
        p = per_tensor(k)
        want = ref_ties({k: base[k]}, {k: models[k]}, [p["density"]] * 3, lam=p["lambda"], scope="tensor")
        np.testing.assert_allclose(got[k], want[k].reshape(base[k].shape), rtol=1e-6, atol=1e-6)
    # λ may vary per tensor under global scope; density may not
    got, _ = run("ties", base, models, params={"scope": "global", "density": 0.2},
                 per_tensor=lambda k: {"lambda": 0.5} if k.startswith("a.") else None)
    want = ref_ties(base, models, [0.2] * 3, scope="global")
    for k in base:
        lam = 0.5 if k.startswith("a.") else 1.0
        expect = base[k].reshape(-1) + lam * (want[k] - base[k].reshape(-1))
        np.testing.assert_allclose(got[k], expect.reshape(base[k].shape), rtol=1e-6, atol=1e-6)
    with pytest.raises(RecipeError, match="density.*'a.weight'.*'a.bias'"):
        run("ties", base, models, params={"scope": "global"}, per_tensor=lambda k: {"density": 0.6} if k == "a.bias" else None)


# -- DARE ------------------------------------------------------------------------------------

def ref_dare_mask(seed: int, model_id: int, name: str, size: int, density: float) -> np.ndarray:
    """The documented generator: blake2b stream key, two MurmurHash3 finalisers over the element index."""
    digest = hashlib.blake2b(f"alloy-dare|{seed}|{model_id}|{name}".encode(), digest_size=8).digest()
    k0, k1 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
    M = np.uint64(0xFFFFFFFF)

    def fmix(x):
        x = x & M
        x ^= x >> np.uint64(16)
        x = (x * np.uint64(0x85EBCA6B)) & M
        x ^= x >> np.uint64(13)
        x = (x * np.uint64(0xC2B2AE35)) & M
        return x ^ (x >> np.uint64(16))

    j = np.arange(size, dtype=np.uint64)
    x = fmix((j & M) ^ np.uint64(k0))
    x = fmix(x ^ np.uint64(k1) ^ (((j >> np.uint64(32)) * np.uint64(0x9E3779B9)) & M))
    return x < np.uint64(int(round(density * 2**32)))


def ref_dare_tv(base, models, densities, seed, ids=None, rescale=True):
    n = next(iter(models.values())).shape[0]
    ids = list(range(n)) if ids is None else ids
    tv = task_vectors(base, models, base)
    out = {}
    for k, t in tv.items():
        t = t.copy()
        for i in range(n):
            mask = ref_dare_mask(seed, ids[i], k, t.shape[1], densities[i])
            t[i] = np.where(mask, t[i] / (densities[i] if rescale else 1.0), 0.0)
        out[k] = t
    return out


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_dare_linear_matches_reference(backend_name):
    base, models = make_family(3, seed=8)
    dens, w = [0.5, 0.25, 0.125], [1.0, -0.5, 2.0]  # powers of two: the rescale is exact
    got, _ = run("dare_linear", base, models, backend_name, {"density": dens, "weight": w, "lambda": 0.75}, seed=42)
    tv = ref_dare_tv(base, models, dens, 42)
    want = {k: base[k].reshape(-1) + 0.75 * sum(w[i] * tv[k][i] for i in range(3)) for k in base}
    assert_close(got, want, base)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_dare_ties_matches_reference(backend_name, scope):
    base, models = make_family(3, seed=9)
    dens = [0.5, 0.5, 0.25]
    params = {"density": dens, "trim_density": 0.3, "scope": scope, "lambda": 0.9}
    got, _ = run("dare_ties", base, models, backend_name, params, seed=3)
    tv = ref_dare_tv(base, models, dens, 3)
    delta = per_scope(tv, scope, lambda x: ref_elect_merge(ref_trim(x, [0.3] * 3), [1.0] * 3))
    want = {k: base[k].reshape(-1) + 0.9 * delta[k] for k in base}
    assert_close(got, want, base)
    # without the rescale, and with the trim off (DARE as the only sparsifier)
    got, _ = run("dare_ties", base, models, backend_name, {**params, "rescale": False, "trim_density": 1.0}, seed=3)
    tv = ref_dare_tv(base, models, dens, 3, rescale=False)
    delta = per_scope(tv, scope, lambda x: ref_elect_merge(x, [1.0] * 3))
    assert_close(got, {k: base[k].reshape(-1) + 0.9 * delta[k] for k in base}, base)


def _dare_masks(backend_name, names_order=None, ids=(0, 1), seed=5, threads=None, density=0.3):
    """Both models' masks from one dare_linear run: τ = 1 everywhere and weights 1 and 2 encode them."""
    # x.w is large enough to be split into chunks, differently for 1 and 2 threads
    base = {"x.w": np.zeros((1000, 1200), np.float32), "y.w": np.zeros(5000, np.float32)}
    models = {k: np.ones((2, *v.shape), np.float32) for k, v in base.items()}
    if threads is not None:
        import numba

        before = numba.get_num_threads()
        numba.set_num_threads(threads)
    try:
        got, _ = run("dare_linear", base, models, backend_name, {"density": density, "rescale": False, "weight": [1.0, 2.0]},
                     seed=seed, model_ids=ids, order=names_order)
    finally:
        if threads is not None:
            numba.set_num_threads(before)
    assert all(set(np.unique(v)) <= {0.0, 1.0, 2.0, 3.0} for v in got.values())
    return {ids[0]: {k: v % 2 == 1 for k, v in got.items()}, ids[1]: {k: v >= 2 for k, v in got.items()}}


def test_dare_mask_is_identical_across_backends_runs_threads_and_order():
    import numba

    ref = _dare_masks("numba")
    for i in (0, 1):
        for k, mask in ref[i].items():
            np.testing.assert_array_equal(mask.reshape(-1), ref_dare_mask(5, i, k, mask.size, 0.3))
    variants = [
        _dare_masks("torch"),
        _dare_masks("numba"),
        _dare_masks("numba", threads=1),
        _dare_masks("numba", threads=min(2, numba.config.NUMBA_NUM_THREADS)),
        _dare_masks("numba", names_order=["y.w", "x.w"]),
        _dare_masks("numba", ids=(1, 0)),  # a model's mask follows its id, not its position
    ]
    for masks in variants:
        for i in (0, 1):
            for k in ref[i]:
                np.testing.assert_array_equal(masks[i][k], ref[i][k])
    other = _dare_masks("numba", seed=6)
    assert not np.array_equal(other[0]["x.w"], ref[0]["x.w"])
    assert not np.array_equal(ref[0]["x.w"], ref[1]["x.w"])


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_is_density(density):
    base = {"w": np.zeros(400_000, np.float32)}
    models = {"w": np.ones((2, 400_000), np.float32)}
    got, _ = run("dare_linear", base, models, params={"density": density, "rescale": True}, seed=11)
    for i in range(2):
        one = {"w": models["w"][i:i + 1]}
        out, _ = run("dare_linear", base, one, params={"density": density}, seed=11, model_ids=(i,))
        kept = np.count_nonzero(out["w"]) / out["w"].size
        assert abs(kept - density) < 0.004
        np.testing.assert_allclose(out["w"][out["w"] != 0], 1.0 / density, rtol=1e-6)
    # the rescale keeps the mean task vector: Σ over 2 models of mask/density ≈ 2
    assert abs(got["w"].mean() - 2.0) < 0.02


def test_dare_density_extremes():
    base, models = make_family(2, seed=12)
    got, _ = run("dare_linear", base, models, params={"density": 1.0})
    tv = task_vectors(base, models, base)
    assert_close(got, {k: base[k].reshape(-1) + tv[k].sum(0) for k in base}, base)
    got, _ = run("dare_linear", base, models, params={"density": 0.0})
    assert_close(got, {k: base[k].reshape(-1).astype(np.float64) for k in base}, base)


# -- Breadcrumbs -----------------------------------------------------------------------------

def ref_breadcrumb_mask_rows(a: np.ndarray, density: float, outlier: float, stable_order: bool) -> np.ndarray:
    """a: (rows, L) magnitudes -> keep mask. stable_order=True is the official topk order (distinct values)."""
    rows, L = a.shape
    n_top = int(np.floor(outlier * L))
    n_keep = min(int(np.floor(density * L)), L - n_top)
    keep = np.zeros_like(a, dtype=bool)
    for r in range(rows):
        if stable_order:
            order = np.argsort(-a[r], kind="stable")
            keep[r, order[n_top:n_top + n_keep]] = True
        else:
            desc = np.sort(a[r])[::-1]
            top = desc[n_top - 1] if n_top > 0 else np.inf
            low = desc[n_top + n_keep - 1] if n_keep > 0 else np.inf
            keep[r] = (a[r] >= low) & (a[r] < top)
    return keep


def ref_breadcrumbs(base, models, density, outlier, lam, scope, w=None, stable_order=False):
    n = next(iter(models.values())).shape[0]
    w = [1.0] * n if w is None else w
    tv = task_vectors(base, models, base, w)
    out = {}
    if scope == "global":
        def fn(x):
            return sum(np.where(ref_breadcrumb_mask_rows(np.abs(x[i:i + 1]), density, outlier, stable_order)[0], x[i], 0) for i in range(n))
        delta = per_scope(tv, "global", fn)
        return {k: base[k].reshape(-1) + lam * delta[k] for k in base}
    for k, t in tv.items():
        shape = base[k].shape
        if scope == "row" and len(shape) == 0:
            out[k] = base[k].reshape(-1) + lam * t.sum(0)
            continue
        L = shape[-1] if scope == "row" else t.shape[1]
        acc = np.zeros(t.shape[1])
        for i in range(n):
            x = t[i].reshape(-1, L)
            keep = ref_breadcrumb_mask_rows(np.abs(x), density, outlier, stable_order)
            acc += np.where(keep, x, 0).reshape(-1)
        out[k] = base[k].reshape(-1) + lam * acc
    return out


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("scope", ["row", "tensor", "global"])
def test_breadcrumbs_matches_reference_with_ties(backend_name, scope):
    base, models = make_family(3, seed=13, spread=3)
    params = {"density": 0.3, "outlier_frac": 0.1, "lambda": 0.5, "scope": scope, "weight": [1.0, -1.0, 2.0]}
    got, _ = run("breadcrumbs", base, models, backend_name, params)
    assert_close(got, ref_breadcrumbs(base, models, 0.3, 0.1, 0.5, scope, w=[1.0, -1.0, 2.0]), base)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_breadcrumbs_equals_official_order_on_distinct_magnitudes(backend_name):
    rng = np.random.default_rng(14)
    shapes = {"l.w": (6, 50), "l.b": (50,), "c.w": (2, 3, 4, 19), "s": (), "r20": (3, 20), "r19": (3, 19)}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    models = {k: (base[k][None] + rng.standard_normal((2, *s)).astype(np.float32)) for k, s in shapes.items()}
    got, _ = run("breadcrumbs", base, models, backend_name, {"density": 0.05, "outlier_frac": 0.01, "lambda": 1.0})
    want = ref_breadcrumbs(base, models, 0.05, 0.01, 1.0, "row", stable_order=True)
    assert_close(got, want, base, rtol=1e-5, atol=1e-5)
    # a row of 19 keeps nothing at density 0.05, a row of 20 keeps one entry per model
    np.testing.assert_array_equal(got["r19"], base["r19"].astype(np.float64))
    kept = (got["r20"] != base["r20"]).sum(axis=1)
    assert set(kept.tolist()) <= {1, 2}
    assert np.count_nonzero(got["s"] - base["s"]) == 1  # 0-d tensors keep their task vector


def test_breadcrumbs_all_zero_and_single_model():
    base, models = make_family(2, seed=15, zero_models=(0, 1))
    got, _ = run("breadcrumbs", base, models)
    for k in base:
        np.testing.assert_array_equal(got[k], base[k].astype(np.float64))
    base, models = make_family(1, seed=16)
    for scope in ("row", "tensor", "global"):
        got, _ = run("breadcrumbs", base, models, params={"scope": scope, "density": 0.4, "outlier_frac": 0.05})
        assert_close(got, ref_breadcrumbs(base, models, 0.4, 0.05, 0.2, scope), base)


# -- PCB -------------------------------------------------------------------------------------

def ref_pcb_delta(x: np.ndarray, ratio: float, clip: float, lamw) -> np.ndarray:
    """The official PCB_merge on (n, D) task vectors, float64."""
    n, d = x.shape
    a = np.abs(x)
    srt = np.sort(a, axis=1)
    lo = srt[:, int(d * clip)][:, None]
    hi = srt[:, int(d * (1 - clip) - 1)][:, None]
    a = np.clip(a, lo, hi)
    clipped = np.sign(x) * a
    span = hi - lo
    mm = np.where(span > 0, (a - lo) / np.where(span > 0, span, 1), 0.0)
    s = np.exp(n * mm ** 2) * np.tanh(x * x.sum(0))
    q = np.sort(s, axis=1)[:, int(d * (1 - ratio))][:, None]
    smax = s.max(axis=1, keepdims=True)
    sspan = smax - q
    wgt = np.where(sspan > 0, (np.maximum(s, q) - q) / np.where(sspan > 0, sspan, 1), 0.0)
    return (np.asarray(lamw, np.float64)[:, None] * wgt * clipped).sum(0) / np.maximum(wgt.sum(0), 1e-12)


def ref_pcb(base, models, ratio, clip, lam, scope, lamw=None):
    n = next(iter(models.values())).shape[0]
    lamw = [1.0] * n if lamw is None else lamw
    tv = task_vectors(base, models, base)
    delta = per_scope(tv, scope, lambda x: ref_pcb_delta(x, ratio, clip, lamw))
    return {k: base[k].reshape(-1) + lam * delta[k] for k in base}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_pcb_matches_reference(backend_name, scope):
    base, models = make_family(3, seed=17, spread=20, scale=256.0)
    params = {"pcb_ratio": 0.2, "clip_ratio": 0.01, "lambda": 1.2, "scope": scope, "weight": [1.0, 0.5, 1.5]}
    got, stats = run("pcb", base, models, backend_name, params)
    assert_close(got, ref_pcb(base, models, 0.2, 0.01, 1.2, scope, [1.0, 0.5, 1.5]), base, rtol=1e-5, atol=2e-6)
    if scope == "global":
        assert stats.passes == 4


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_pcb_default_settings_and_edge_cases(scope):
    base, models = make_family(2, seed=18, spread=20, scale=256.0)
    got, _ = run("pcb", base, models, params={"scope": scope})
    assert_close(got, ref_pcb(base, models, 0.1, 1e-4, 1.0, scope), base, rtol=1e-5, atol=2e-6)
    # an unchanged model gets zero weight: the merge is the other model's PCB-weighted task vector
    base, models = make_family(2, seed=19, spread=20, scale=256.0, zero_models=(1,))
    got, _ = run("pcb", base, models, params={"scope": scope})
    assert_close(got, ref_pcb(base, models, 0.1, 1e-4, 1.0, scope), base, rtol=1e-5, atol=2e-6)
    base, models = make_family(1, seed=20, spread=20, scale=256.0)  # N = 1: inter = tanh(τ²) >= 0
    got, _ = run("pcb", base, models, params={"scope": scope, "pcb_ratio": 0.3})
    assert_close(got, ref_pcb(base, models, 0.3, 1e-4, 1.0, scope), base, rtol=1e-5, atol=2e-6)
    base, models = make_family(2, seed=21, zero_models=(0, 1))
    got, _ = run("pcb", base, models, params={"scope": scope})
    for k in base:
        np.testing.assert_array_equal(got[k], base[k].astype(np.float64))


def test_pcb_global_settings_must_not_vary_per_tensor():
    base, models = make_family(2, seed=22)
    with pytest.raises(RecipeError, match="pcb_ratio"):
        run("pcb", base, models, params={"scope": "global"}, per_tensor=lambda k: {"pcb_ratio": 0.3} if k == "d.big" else None)


# -- every method: both backends agree, registry and parameters -------------------------------

@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "pcb"])
def test_numba_and_torch_cpu_agree(name):
    base, models = make_family(3, seed=23, spread=12, scale=256.0)
    a, _ = run(name, base, models, "numba", seed=9)
    b, _ = run(name, base, models, "torch", seed=9)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_methods_are_registered_with_documented_parameters():
    for name in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "pcb"):
        method = get_method(name)
        assert method.needs_base
        for p in method.params:
            assert len(p.help) > 20, (name, p.name)
    assert get_method("ties").param("scale").name == "lambda"
    assert get_method("breadcrumbs").param("gamma").name == "outlier_frac"
    assert get_method("ties").param("scope").default == "global"
    assert get_method("breadcrumbs").param("scope").default == "row"
    assert get_method("pcb").param("scope").default == "global"
    assert get_method("ties").param("density").per_model
    assert get_method("ties").needs_prepare({"scope": "global"}) and not get_method("ties").needs_prepare({"scope": "tensor"})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "pcb"])
def test_cuda_matches_numba(name):
    base, models = make_family(3, seed=24, spread=12, scale=256.0)
    a, _ = run(name, base, models, "numba", seed=9)
    method = get_method(name)
    gpu = get_backend("torch", "cuda")
    top = full_params(method)
    def stream():
        for k in sorted(base):
            yield TensorJob(k, torch.from_numpy(base[k]).cuda(), torch.from_numpy(models[k]).cuda(), torch.ones(3), dict(top),
                            seed=9, backend=gpu, model_ids=(0, 1, 2))
    stats = method.prepare(top, stream) if method.needs_prepare(top) else None
    for job in stream():
        got = method.merge(replace(job, stats=stats))
        assert got.device.type == "cuda"
        np.testing.assert_allclose(got.cpu().numpy(), a[job.name], rtol=1e-5, atol=1e-6, err_msg=job.name)
