"""The sparse methods through recipes and the streaming executor (prepare pass, overrides, dtypes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_model
from merging.errors import AlloyError, RecipeError
from merging.executor import run_merge
from merging.recipe import load_recipe
from test_methods_sparse import per_scope, ref_dare_tv, ref_elect_merge, ref_pcb, ref_trim, ref_ties

SHAPES = {"embed.weight": (30, 16), "layers.0.w": (16, 16), "layers.0.b": (16,), "layers.1.w": (12, 16), "head.w": (4, 12)}


def _family(tmp_path: Path, n: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Grid-valued checkpoints (exact in bf16 too) and an integer buffer that must be copied."""
    rng = np.random.default_rng(seed)
    base = {k: (rng.integers(-32, 32, s) / 32).astype(np.float32) for k, s in SHAPES.items()}
    models = {k: np.stack([b + (rng.integers(-8, 9, b.shape) / 64).astype(np.float32) for _ in range(n)]) for k, b in base.items()}
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)  # noqa: E731
    write_model(tmp_path / "base", {**{k: to_t(v) for k, v in base.items()}, "bn.num_batches_tracked": torch.tensor(3)})
    for i in range(n):
        write_model(tmp_path / f"ft{i}", {**{k: to_t(v[i]) for k, v in models.items()}, "bn.num_batches_tracked": torch.tensor(3)})
    return base, models


def _merge(tmp_path: Path, text: str) -> dict[str, np.ndarray]:
    (tmp_path / "recipe.yaml").write_text(text)
    run_merge(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", overwrite=True)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert int(got.pop("bn.num_batches_tracked")) == 3
    return {k: v.double().numpy() for k, v in got.items()}


def _close(got, want, base, tol=1e-6):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k].reshape(base[k].shape), rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_ties_global_recipe_with_weights_and_lambda_override(tmp_path, backend):
    base, models = _family(tmp_path)
    got = _merge(tmp_path, f"""
merge_method: ties
base_model: base
backend: {backend}
device: cpu
models:
  - {{model: ft0, parameters: {{weight: 1.0, density: 0.3}}}}
  - {{model: ft1, parameters: {{weight: -0.5}}}}
  - {{model: ft2, parameters: {{weight: 2.0}}}}
parameters: {{density: 0.2, scope: global}}
overrides:
  - {{match: '^head', parameters: {{lambda: 0.5}}}}
""")
    want = ref_ties(base, models, [0.3, 0.2, 0.2], [1.0, -0.5, 2.0], scope="global")
    want["head.w"] = base["head.w"].reshape(-1) + 0.5 * (want["head.w"] - base["head.w"].reshape(-1))
    _close(got, want, base)


def test_ties_tensor_scope_per_layer_density_and_bf16_inputs(tmp_path):
    base, models = _family(tmp_path, dtype=torch.bfloat16)
    got = _merge(tmp_path, """
merge_method: ties
base_model: base
dtype: float32
models: [ft0, ft1, ft2]
parameters: {density: 0.2, scope: tensor}
overrides:
  - {match: '^layers\\.0\\.', parameters: {density: 0.6}}
""")
    want = {}
    for k in base:
        d = 0.6 if k.startswith("layers.0.") else 0.2
        want.update(ref_ties({k: base[k]}, {k: models[k]}, [d] * 3, scope="tensor"))
    # the output is bf16 like the base: compare after rounding the reference the same way
    want = {k: torch.from_numpy(v).to(torch.bfloat16).double().numpy() for k, v in want.items()}
    _close(got, want, base, tol=1e-2)


def test_global_scope_refuses_per_layer_density(tmp_path):
    _family(tmp_path)
    (tmp_path / "recipe.yaml").write_text("""
merge_method: ties
base_model: base
models: [ft0, ft1]
parameters: {density: 0.2}
overrides:
  - {match: '^layers', parameters: {density: 0.5}}
""")
    with pytest.raises(RecipeError, match="density.*scope: tensor"):
        run_merge(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dare_ties_and_pcb_recipes(tmp_path):
    base, models = _family(tmp_path)
    got = _merge(tmp_path, """
merge_method: dare_ties
base_model: base
seed: 17
models: [ft0, ft1, ft2]
parameters: {density: 0.5, trim_density: 0.4, lambda: 0.8}
""")
    tv = ref_dare_tv(base, models, [0.5] * 3, 17)
    delta = per_scope(tv, "global", lambda x: ref_elect_merge(ref_trim(x, [0.4] * 3), [1.0] * 3))
    _close(got, {k: base[k].reshape(-1) + 0.8 * delta[k] for k in base}, base)
    got = _merge(tmp_path, """
merge_method: pcb
base_model: base
models: [ft0, ft1, ft2]
parameters: {pcb_ratio: 0.2, clip_ratio: 0.01}
""")
    _close(got, ref_pcb(base, models, 0.2, 0.01, 1.0, "global"), base, tol=1e-5)


def test_unknown_backend_is_a_recipe_error(tmp_path):
    _family(tmp_path, n=2)
    (tmp_path / "recipe.yaml").write_text("merge_method: breadcrumbs\nbase_model: base\nmodels: [ft0, ft1]\nbackend: torch\ndevice: cuda\n")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(AlloyError, match="cuda|CUDA"):
        run_merge(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out")
