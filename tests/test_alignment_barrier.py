"""Interpolation and the loss barrier, against hand-computed values and a permuted copy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from merging.alignment import (
    DEFAULT_ALPHAS,
    apply_permutations,
    interpolate,
    load_spec,
    loss_barrier,
    random_permutations,
    weight_matching,
)


def test_interpolate_matches_numpy():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(4, 3, generator=g), "h": torch.randn(5, generator=g).to(torch.bfloat16), "n": torch.tensor(4)}
    b = {"w": torch.randn(4, 3, generator=g), "h": torch.randn(5, generator=g).to(torch.bfloat16), "n": torch.tensor(8)}
    out = interpolate(a, b, 0.3)
    np.testing.assert_allclose(out["w"].numpy(), 0.7 * a["w"].double().numpy() + 0.3 * b["w"].double().numpy(), rtol=1e-6, atol=1e-7)
    assert out["h"].dtype == torch.bfloat16
    expected_h = torch.from_numpy(0.7 * a["h"].double().numpy() + 0.3 * b["h"].double().numpy()).to(torch.bfloat16)
    assert torch.equal(out["h"], expected_h)
    assert int(out["n"]) == 4
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])


def test_barrier_formulas_on_a_known_curve():
    """Loss = (x − 1)² + 0.5·x with x the interpolated scalar: the curve is known in closed form."""
    a, b, b_al = {"x": torch.tensor(0.0)}, {"x": torch.tensor(2.0)}, {"x": torch.tensor(0.0)}

    def loss(p):
        x = float(p["x"])
        return {"loss": (x - 1) ** 2 + 0.5 * x, "x": x}

    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    res = loss_barrier(loss, a, b, b_al, alphas)
    xs = [2 * t for t in alphas]
    expected = [(x - 1) ** 2 + 0.5 * x for x in xs]
    assert res.naive.losses == pytest.approx(expected)
    assert res.naive.metrics["x"] == pytest.approx(xs)
    la, lb = expected[0], expected[-1]
    assert res.naive_barrier == pytest.approx(max(expected) - 0.5 * (la + lb))
    assert res.naive.barrier_linear(alphas) == pytest.approx(max(e - ((1 - t) * la + t * lb) for t, e in zip(alphas, expected)))
    assert res.aligned.losses == pytest.approx([1.0] * 5)
    assert res.aligned_barrier == pytest.approx(0.0)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["naive"]["barrier"] == pytest.approx(res.naive_barrier)
    assert d["alphas"] == alphas
    with pytest.raises(ValueError):
        loss_barrier(loss, a, b, b_al, [0.0, 0.5])


def test_permuted_copy_has_no_aligned_barrier():
    """B = A with shuffled hidden units: naive interpolation hurts, the aligned path is flat (exactly A)."""
    torch.manual_seed(0)
    x = torch.randn(256, 6, dtype=torch.float64)
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).double()
    a = {n: t.detach().clone() for n, t in teacher.state_dict().items()}
    y = teacher(x).detach()
    spec = load_spec("mlp", {n: tuple(t.shape) for n, t in a.items()})
    b = apply_permutations(spec, a, random_permutations(spec, spec.validate({n: tuple(t.shape) for n, t in a.items()}), seed=1))

    def mse(p):
        teacher.load_state_dict(p)
        with torch.no_grad():
            return float(((teacher(x) - y) ** 2).mean())

    b_al = apply_permutations(spec, b, weight_matching(spec, a, b).perms)
    res = loss_barrier(mse, a, b, b_al)
    assert res.alphas == list(DEFAULT_ALPHAS) and len(res.alphas) == 25
    assert res.naive_barrier > 0.5 * float(y.var())  # the naive path loses most of the signal on the way
    assert res.aligned_barrier == 0.0
    assert max(res.aligned.losses) == 0.0
