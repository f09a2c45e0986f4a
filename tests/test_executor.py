"""The streaming executor against slow references, and its all-or-nothing output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import random_family, write_model
from merging.checkpoint import open_checkpoint
from merging.errors import CheckpointError, ExportError, MergeCancelled
from merging.executor import iter_merged_tensors, run_merge
from merging.export import STAGING_PREFIX
from merging.progress import CancelToken
from merging.recipe import load_recipe, parse_recipe

CONFIG = {"architectures": ["TinyNet"], "model_type": "tiny", "transformers_version": "4.50.0"}


def _family(tmp_path: Path, n: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0):
    base, fts = random_family(n, seed=seed, dtype=dtype)
    write_model(tmp_path / "base", base, CONFIG)
    (tmp_path / "base" / "tokenizer.json").write_text('{"version": "1.0"}')
    for i, ft in enumerate(fts):
        write_model(tmp_path / f"ft{i}", ft, CONFIG)
    return base, fts


def _recipe(tmp_path: Path, text: str):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return load_recipe(p)


# -- slow, obvious references (float64) -------------------------------------------
def ref_linear(models: list[dict], weights: list[float], normalize: bool) -> dict:
    out = {}
    for k in models[0]:
        if not models[0][k].is_floating_point():
            out[k] = models[0][k]
            continue
        acc = sum(w * m[k].double() for w, m in zip(weights, models))
        out[k] = acc / sum(weights) if normalize else acc
    return out


def ref_task_arithmetic(base: dict, models: list[dict], weights: list[float], lam: float) -> dict:
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        out[k] = b.double() + lam * sum(w * (m[k].double() - b.double()) for w, m in zip(weights, models))
    return out


def _assert_matches(got: dict, want: dict, dtype: torch.dtype) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        if not v.is_floating_point():
            assert torch.equal(got[k], v), k
            continue
        assert got[k].dtype == dtype, k
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(got[k].double(), v.to(dtype).double(), atol=tol, rtol=tol, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_task_arithmetic_matches_reference(tmp_path: Path, dtype: torch.dtype) -> None:
    base, fts = _family(tmp_path, dtype=dtype)
    recipe = _recipe(
        tmp_path,
        """
merge_method: task_arithmetic
base_model: base
models:
  - {model: ft0, parameters: {weight: 1.0}}
  - {model: ft1, parameters: {weight: -0.5}}
  - {model: ft2, parameters: {weight: 0.25}}
parameters: {lambda: 0.7}
""",
    )
    result = run_merge(recipe, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    _assert_matches(got, ref_task_arithmetic(base, fts, [1.0, -0.5, 0.25], 0.7), dtype)
    assert result.merged_tensors == 6 and result.tensors == 7
    assert result.input_bytes == 4 * sum(v.numel() * v.element_size() for k, v in base.items() if v.is_floating_point()) + 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference_without_base(tmp_path: Path, dtype: torch.dtype, normalize: bool) -> None:
    _, fts = _family(tmp_path, dtype=dtype)
    recipe = _recipe(
        tmp_path,
        f"""
merge_method: linear
models:
  - {{model: ft0, parameters: {{weight: 2.0}}}}
  - {{model: ft1}}
  - {{model: ft2, parameters: {{weight: 0.5}}}}
parameters: {{normalize: {str(normalize).lower()}}}
copy_files_from: "1"
""",
    )
    run_merge(recipe, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    _assert_matches(got, ref_linear(fts, [2.0, 1.0, 0.5], normalize), dtype)
    assert (tmp_path / "out" / "config.json").is_file()


def test_out_dtype_and_compute_in_float32(tmp_path: Path) -> None:
    base, fts = _family(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1]\nout_dtype: bfloat16\n")
    run_merge(recipe, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = ref_task_arithmetic(base, fts[:2], [1.0, 1.0], 1.0)
    _assert_matches(got, want, torch.bfloat16)
    assert got["bn.num_batches_tracked"].dtype == torch.int64


def test_output_folder_contents(tmp_path: Path) -> None:
    _family(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1]\nparameters: {lambda: 0.5}\n")
    result = run_merge(recipe, tmp_path / "out", license="apache-2.0")
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "alloy_recipe.yaml", "config.json", "mergekit_config.yml", "model.safetensors", "tokenizer.json"]
    assert result.files == sorted(set(names) - {"mergekit_config.yml"}) or set(result.files) <= set(names)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"base_model": ["base", "ft0", "ft1"], "tags": ["merge", "alloy"], "library_name": "transformers", "license": "apache-2.0"}
    assert "merge_method: task_arithmetic" in card
    again = load_recipe(out / "alloy_recipe.yaml")
    assert again.to_dict() == recipe.to_dict()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["alloy_recipe"])["merge_method"] == "task_arithmetic"
    assert json.loads((out / "config.json").read_text()) == CONFIG


def test_sharded_output_loads_back_identical(tmp_path: Path) -> None:
    _family(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1, ft2]\n")
    run_merge(recipe, tmp_path / "single")
    run_merge(recipe, tmp_path / "sharded", shard_size=300)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    single = open_checkpoint(tmp_path / "single")
    sharded = open_checkpoint(tmp_path / "sharded")
    assert single.names() == sharded.names()
    for name in single.names():
        assert torch.equal(single.get(name), sharded.get(name)), name


def test_merge_is_deterministic_byte_for_byte(tmp_path: Path) -> None:
    _family(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1, ft2]\nseed: 3\n")
    run_merge(recipe, tmp_path / "a")
    run_merge(recipe, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_cancel_leaves_nothing_at_target(tmp_path: Path) -> None:
    _family(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1, ft2]\n")
    cancel = CancelToken()
    seen = []

    def on_progress(ev) -> None:
        seen.append(ev)
        if ev.stage == "merge" and ev.done == 2:
            cancel.cancel()

    with pytest.raises(MergeCancelled):
        run_merge(recipe, tmp_path / "out", progress=on_progress, cancel=cancel)
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)
    assert max(e.done for e in seen) == 2


def test_failure_midway_leaves_nothing_and_names_file_and_tensor(tmp_path: Path) -> None:
    base, fts = _family(tmp_path)
    fts[1]["layers.1.w"][0, 0] = float("nan")
    write_model(tmp_path / "ft1", fts[1], CONFIG)
    recipe = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1]\n")
    with pytest.raises(CheckpointError) as err:
        run_merge(recipe, tmp_path / "out")
    assert err.value.tensor == "layers.1.w" and "ft1" in str(err.value) and "NaN" in str(err.value)
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)
    allowed = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1]\nallow_nonfinite: true\n")
    run_merge(allowed, tmp_path / "out")
    assert torch.isnan(load_file(str(tmp_path / "out" / "model.safetensors"))["layers.1.w"][0, 0])


def test_global_scope_checks_values_on_its_first_pass_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import merging.executor as executor

    base, fts = _family(tmp_path)
    checked: list[str] = []
    real = executor._check_finite
    monkeypatch.setattr(executor, "_check_finite", lambda t, ck, name: (checked.append(name), real(t, ck, name)))
    text = "merge_method: ties\nbase_model: base\nmodels: [ft0, ft1]\nparameters: {density: 0.5, scope: global}\n"
    run_merge(_recipe(tmp_path, text), tmp_path / "out")
    assert sorted(checked) == sorted(n for n, t in base.items() if t.is_floating_point() for _ in range(3))  # base + 2 models, once each
    fts[1]["layers.1.w"][0, 0] = float("inf")
    write_model(tmp_path / "ft1", fts[1], CONFIG)
    with pytest.raises(CheckpointError, match="Inf") as err:
        run_merge(_recipe(tmp_path, text), tmp_path / "out2")
    assert err.value.tensor == "layers.1.w" and "ft1" in str(err.value)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_tensors_a_dry_run_yields_stay_intact_while_later_ones_are_read(tmp_path: Path, method: str) -> None:
    """Read buffers are recycled between tensors; never one the caller still holds."""
    g = torch.Generator().manual_seed(3)
    shapes = {f"layers.{i}.w": (512, 640) for i in range(6)}  # 1.3 MB each: pooled
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    write_model(tmp_path / "base", base, CONFIG)
    for i in range(2):
        write_model(tmp_path / f"ft{i}", {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, CONFIG)
    extra = "parameters: {density: 0.5, scope: global}\n" if method == "ties" else ""
    recipe = _recipe(tmp_path, f"merge_method: {method}\nbase_model: base\nmodels: [ft0, ft1]\n{extra}")
    kept = [(name, b, m, b.clone(), m.clone()) for name, b, m in iter_merged_tensors(recipe)]
    assert [k[0] for k in kept] == list(shapes)
    for name, b, m, b_copy, m_copy in kept:
        assert torch.equal(b, b_copy) and torch.equal(b, base[name]), name
        assert torch.equal(m, m_copy), name
    assert len({b.data_ptr() for _, b, *_ in kept}) == len(kept)


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path) -> None:
    _family(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0]\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match="not empty"):
        run_merge(recipe, out)
    assert (out / "keep.txt").read_text() == "old"
    run_merge(recipe, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    _no_leftovers(tmp_path)


def test_missing_tensor_and_shape_mismatch_are_named(tmp_path: Path) -> None:
    base, fts = _family(tmp_path)
    del fts[0]["head.w"]
    write_model(tmp_path / "ft0", fts[0], CONFIG)
    text = "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1]\n"
    with pytest.raises(CheckpointError) as err:
        run_merge(_recipe(tmp_path, text), tmp_path / "out")
    assert err.value.tensor == "head.w" and err.value.path.name in ("ft0", "model.safetensors")
    assert "missing" in str(err.value)
    result = run_merge(_recipe(tmp_path, text + "missing_tensors: base\n"), tmp_path / "out")
    assert any("head.w" in w for w in result.warnings)
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["head.w"], base["head.w"])

    fts[1]["layers.0.w"] = torch.zeros(8, 9)
    write_model(tmp_path / "ft1", fts[1], CONFIG)
    with pytest.raises(CheckpointError, match=r"shape \[8, 9\] differs from \[8, 8\]") as err:
        run_merge(_recipe(tmp_path, text + "missing_tensors: base\n"), tmp_path / "out2")
    assert err.value.tensor == "layers.0.w" and "ft1" in str(err.value)


def test_input_changed_during_merge_is_detected(tmp_path: Path) -> None:
    _family(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1]\n")
    victim = tmp_path / "ft1" / "model.safetensors"

    def touch(ev) -> None:
        if ev.stage == "merge" and ev.done == 1:
            st = victim.stat()
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    with pytest.raises(CheckpointError, match="changed on disk during the merge") as err:
        run_merge(recipe, tmp_path / "out", progress=touch)
    assert err.value.path == victim
    assert not (tmp_path / "out").exists()


def test_progress_counts_tensors_and_bytes(tmp_path: Path) -> None:
    _family(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1]\n")
    events = []
    result = run_merge(recipe, tmp_path / "out", progress=events.append)
    merge = [e for e in events if e.stage == "merge"]
    assert [e.done for e in merge] == list(range(1, 8))
    assert merge[-1].bytes_done == merge[-1].bytes_total == result.input_bytes
    assert merge[-1].fraction == 1.0 and merge[-1].eta_s == 0.0


def test_dry_run_yields_merged_tensors_without_writing(tmp_path: Path) -> None:
    base, fts = _family(tmp_path)
    recipe = _recipe(tmp_path, "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1]\nparameters: {lambda: 0.5}\n")
    want = ref_task_arithmetic(base, fts[:2], [1.0, 1.0], 0.5)
    seen = {}
    for name, b, merged in iter_merged_tensors(recipe):
        torch.testing.assert_close(b, base[name].float())
        seen[name] = merged
    assert set(seen) == {k for k, v in base.items() if v.is_floating_point()}
    for k, v in seen.items():
        torch.testing.assert_close(v.double(), want[k], atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft0", "ft1", "ft2", "recipe.yaml"]


def test_per_layer_override_changes_only_matching_tensors(tmp_path: Path) -> None:
    base, fts = _family(tmp_path)
    recipe = _recipe(
        tmp_path,
        "merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0]\nparameters: {lambda: 1.0}\n"
        "overrides: [{layers: [1, 1], parameters: {lambda: 0.0}}, {match: '^head', parameters: {lambda: 2.0}}]\n",
    )
    run_merge(recipe, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(got["layers.1.w"], base["layers.1.w"])
    torch.testing.assert_close(got["layers.0.w"], fts[0]["layers.0.w"])
    torch.testing.assert_close(got["head.w"], base["head.w"] + 2 * (fts[0]["head.w"] - base["head.w"]))


def test_recipe_as_data_without_file(tmp_path: Path) -> None:
    base, fts = _family(tmp_path)
    recipe = parse_recipe(f"merge_method: linear\nmodels: [{tmp_path / 'ft0'}, {tmp_path / 'ft1'}]\n")
    run_merge(recipe, tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    _assert_matches(got, ref_linear(fts[:2], [1.0, 1.0], True), torch.float32)
