"""Weight matching against slow, obvious references (NumPy float64, brute force over permutations)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from merging.alignment import (
    AttentionGroup,
    PermutationSpec,
    apply_permutations,
    check_permutations,
    random_permutations,
    weight_matching,
)
from merging.alignment.weight_matching import _solve_attention, round_order
from merging.errors import AlloyError, CheckpointError


def mlp_params(seed: int, sizes=(6, 4, 5, 3)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        out[f"fc{i}.weight"] = torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64)
        out[f"fc{i}.bias"] = torch.randn(fan_out, generator=g, dtype=torch.float64)
    return out


MLP_SPEC = PermutationSpec({
    "fc0.weight": ("P0", None), "fc0.bias": ("P0",),
    "fc1.weight": ("P1", "P0"), "fc1.bias": ("P1",),
    "fc2.weight": (None, "P1"), "fc2.bias": (None,),
}, name="mlp3")


def reference_objective(a: dict, b: dict, p0: np.ndarray, p1: np.ndarray) -> float:
    """Σ⟨A, π(B)⟩ over the permuted tensors, written out for the 3-layer MLP with NumPy fancy indexing.

    (`fc2.bias` has no permuted axis: a constant the objective leaves out.)
    """
    A = {k: v.numpy() for k, v in a.items()}
    B = {k: v.numpy() for k, v in b.items()}
    pb = {
        "fc0.weight": B["fc0.weight"][p0, :], "fc0.bias": B["fc0.bias"][p0],
        "fc1.weight": B["fc1.weight"][p1][:, p0], "fc1.bias": B["fc1.bias"][p1],
        "fc2.weight": B["fc2.weight"][:, p1],
    }
    return float(sum((A[k] * pb[k]).sum() for k in pb))


def test_one_group_matches_brute_force():
    """With one hidden layer, one assignment solves it: compare with all 5! relabellings."""
    sizes = (4, 5, 3)
    a, b = mlp_params(0, sizes), mlp_params(1, sizes)
    spec = PermutationSpec({"fc0.weight": ("P0", None), "fc0.bias": ("P0",), "fc1.weight": (None, "P0"), "fc1.bias": (None,)})
    A = {k: v.numpy() for k, v in a.items()}
    B = {k: v.numpy() for k, v in b.items()}

    def value(p):
        return float((A["fc0.weight"] * B["fc0.weight"][list(p)]).sum() + (A["fc0.bias"] * B["fc0.bias"][list(p)]).sum()
                     + (A["fc1.weight"] * B["fc1.weight"][:, list(p)]).sum())

    best = max(itertools.permutations(range(5)), key=value)
    result = weight_matching(spec, a, b, seed=0)
    assert result.perms["P0"].tolist() == list(best)
    assert result.objective == pytest.approx(value(best), rel=1e-12)
    assert result.objectives[0] == pytest.approx(value(range(5)), rel=1e-12)


def test_two_groups_reach_a_coordinatewise_optimum():
    """No single group can be improved by any relabelling once the descent stops (checked by brute force)."""
    a, b = mlp_params(2), mlp_params(3)
    result = weight_matching(MLP_SPEC, a, b, seed=0)
    p0, p1 = result.perms["P0"].numpy(), result.perms["P1"].numpy()
    final = reference_objective(a, b, p0, p1)
    assert result.objective == pytest.approx(final, rel=1e-12)
    best0 = max(reference_objective(a, b, np.array(q), p1) for q in itertools.permutations(range(4)))
    best1 = max(reference_objective(a, b, p0, np.array(q)) for q in itertools.permutations(range(5)))
    assert final >= best0 - 1e-9 and final >= best1 - 1e-9
    # Objective per round never decreases; the first entry is the identity's.
    assert result.objectives[0] == pytest.approx(reference_objective(a, b, np.arange(4), np.arange(5)), rel=1e-12)
    assert all(y >= x - 1e-9 for x, y in zip(result.objectives, result.objectives[1:]))
    assert result.converged and result.rounds == len(result.objectives) - 1


def test_deterministic_given_the_seed():
    a, b = mlp_params(4, (8, 16, 16, 16, 3)), mlp_params(5, (8, 16, 16, 16, 3))
    spec = PermutationSpec({
        "fc0.weight": ("P0", None), "fc0.bias": ("P0",), "fc1.weight": ("P1", "P0"), "fc1.bias": ("P1",),
        "fc2.weight": ("P2", "P1"), "fc2.bias": ("P2",), "fc3.weight": (None, "P2"), "fc3.bias": (None,),
    })
    runs = [weight_matching(spec, a, b, seed=s) for s in (7, 7, 8)]
    assert runs[0].objectives == runs[1].objectives
    for g in ("P0", "P1", "P2"):
        assert torch.equal(runs[0].perms[g], runs[1].perms[g])
    assert round_order(7, 0, 10) == round_order(7, 0, 10)
    assert round_order(7, 0, 10) != round_order(8, 0, 10) or round_order(7, 1, 10) != round_order(8, 1, 10)
    assert sorted(round_order(3, 2, 10)) == list(range(10))


def test_init_is_used_and_checked():
    a = mlp_params(6)
    perms = random_permutations(MLP_SPEC, {"P0": 4, "P1": 5}, seed=1)
    b = apply_permutations(MLP_SPEC, a, perms)
    inverse = {g: torch.argsort(p) for g, p in perms.items()}
    result = weight_matching(MLP_SPEC, a, b, init=inverse)
    assert result.rounds == 1 and result.converged
    assert result.objectives[0] == pytest.approx(sum(float((t ** 2).sum()) for n, t in a.items() if n != "fc2.bias"), rel=1e-12)
    with pytest.raises(AlloyError, match="P0"):
        weight_matching(MLP_SPEC, a, b, init={"P0": torch.tensor([0, 0, 1, 2])})


def test_max_rounds_caps_the_descent():
    a, b = mlp_params(8, (8, 16, 16, 3)), mlp_params(9, (8, 16, 16, 3))
    result = weight_matching(MLP_SPEC, a, b, max_rounds=1)
    assert result.rounds == 1 and len(result.objectives) == 2


def test_shape_mismatch_between_models_names_the_tensor():
    a, b = mlp_params(0), mlp_params(1, (6, 4, 5, 2))
    with pytest.raises(CheckpointError, match="fc2.weight"):
        weight_matching(MLP_SPEC, a, b)


def _block_perms(h: int, d: int):
    """Every block-structured permutation: a head order and an order of dims inside each head."""
    for sigma in itertools.permutations(range(h)):
        for inner in itertools.product(itertools.permutations(range(d)), repeat=h):
            yield np.concatenate([sigma[i] * d + np.array(inner[i]) for i in range(h)])


def test_attention_step_is_the_exact_optimum_of_its_subproblem():
    """Two-level solve (inner LAPs per head pair, outer LAP on heads) vs brute force over all block perms."""
    rng = np.random.default_rng(0)
    h, d = 3, 2
    c_qk, c_vo = rng.normal(size=(h * d, h * d)), rng.normal(size=(h * d, h * d))
    att = AttentionGroup("qk", "vo", h)
    got_qk, got_vo = _solve_attention(att, c_qk, c_vo)
    rows = np.arange(h * d)
    got = c_qk[rows, got_qk].sum() + c_vo[rows, got_vo].sum()
    best = -np.inf
    qk_options = list(_block_perms(h, d))
    for p_qk in qk_options:
        heads = p_qk[::d] // d
        for p_vo in qk_options:
            if np.array_equal(p_vo[::d] // d, heads):  # Q/K and V/O share the head order
                best = max(best, c_qk[rows, p_qk].sum() + c_vo[rows, p_vo].sum())
    assert got == pytest.approx(best, rel=1e-12)
    assert np.array_equal(got_qk[::d] // d, got_vo[::d] // d)


def test_attention_step_without_head_moves():
    rng = np.random.default_rng(1)
    c_qk, c_vo = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    p_qk, p_vo = _solve_attention(AttentionGroup("qk", "vo", 3, permute_heads=False, within_vo=False), c_qk, c_vo)
    assert np.array_equal(p_qk // 2, np.array([0, 0, 1, 1, 2, 2]))
    assert np.array_equal(p_vo, np.arange(6))
    for head in range(3):
        block = c_qk[2 * head:2 * head + 2, 2 * head:2 * head + 2]
        best = max(block[0, 0] + block[1, 1], block[0, 1] + block[1, 0])
        assert block[0, p_qk[2 * head] - 2 * head] + block[1, p_qk[2 * head + 1] - 2 * head] == pytest.approx(best)


def test_head_structure_is_enforced():
    spec = PermutationSpec({"q.weight": ("qk", None), "v.weight": ("vo", None), "o.weight": (None, "vo")},
                           (AttentionGroup("qk", "vo", 2),))
    sizes = {"qk": 4, "vo": 4}
    ok = {"qk": torch.tensor([2, 3, 1, 0]), "vo": torch.tensor([3, 2, 0, 1])}
    check_permutations(spec, ok, sizes)
    with pytest.raises(AlloyError, match="mixes dimensions"):
        check_permutations(spec, {"qk": torch.tensor([0, 2, 1, 3]), "vo": torch.arange(4)}, sizes)
    with pytest.raises(AlloyError, match="share one head permutation"):
        check_permutations(spec, {"qk": torch.tensor([2, 3, 0, 1]), "vo": torch.arange(4)}, sizes)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a, b = mlp_params(10, (8, 32, 32, 3)), mlp_params(11, (8, 32, 32, 3))
    cpu = weight_matching(MLP_SPEC, a, b, seed=0, device="cpu")
    gpu = weight_matching(MLP_SPEC, a, b, seed=0, device="cuda")
    for g in cpu.perms:
        assert torch.equal(cpu.perms[g], gpu.perms[g])
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-9)
