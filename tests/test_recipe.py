"""Recipe parsing: mergekit schema, Alloy extensions, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from merging.errors import RecipeError
from merging.layers import LayerMap, layer_index
from merging.recipe import load_recipe, parse_recipe

MERGEKIT_TIES = """
merge_method: task_arithmetic
base_model: ./base
models:
  - model: ./ft_a
    parameters: {weight: 1.0}
  - model: ./ft_b
    parameters: {weight: 0.5}
parameters: {lambda: 0.8, normalize: true}
dtype: float32
out_dtype: bfloat16
"""


def test_mergekit_recipe_paths_resolve_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(MERGEKIT_TIES)
    r = load_recipe(path)
    assert r.merge_method == "task_arithmetic"
    assert r.base_model == (tmp_path / "base").resolve()
    assert [m.path for m in r.models] == [(tmp_path / "ft_a").resolve(), (tmp_path / "ft_b").resolve()]
    assert r.models[1].parameters == {"weight": 0.5}
    assert r.out_dtype == "bfloat16" and r.dtype == "float32" and r.seed == 0


def test_round_trip_through_yaml_is_identical(tmp_path: Path) -> None:
    text = MERGEKIT_TIES + "seed: 7\noverrides:\n  - {match: 'attn', layers: [1, 3], parameters: {lambda: 0.3}}\n"
    r = parse_recipe(text, base_dir=tmp_path)
    again = parse_recipe(r.to_yaml(), base_dir=Path("/elsewhere"))
    assert again.to_dict() == r.to_dict()
    assert again.overrides[0].layers == (1, 3) and again.seed == 7


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("merge_method: ta\nmodels: [a]", "merge_method"),
        ("merge_method: linear\nmodels: []", "models"),
        ("merge_method: linear\nmodels: [a]\nbogus: 1", "bogus"),
        ("merge_method: linear\nmodels: [a]\nslices: []", "slices"),
        ("merge_method: linear\nmodels: [a]\ntokenizer_source: union", "tokenizer_source"),
        ("merge_method: task_arithmetic\nmodels: [a]", "base_model"),
        ("merge_method: linear\nmodels: [a]\nparameters: {density: 0.5}", "parameters.density"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {normalize: true}}]", "models[0].parameters.normalize"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: abc}}]", "models[0].parameters.weight"),
        ("merge_method: linear\nmodels: [a]\ndevice: tpu", "device"),
        ("merge_method: linear\nmodels: [a]\nout_dtype: int8", "out_dtype"),
        ("merge_method: linear\nmodels: [a]\ndtype: float13", "dtype"),
        ("merge_method: linear\nmodels: [a]\nseed: -1", "seed"),
        ("merge_method: linear\nmodels: [{model: a, layer_range: [0, 4]}]", "models[0].layer_range"),
        ("merge_method: linear\nmodels: [a]\noverrides: [{parameters: {weight: 1}}]", "overrides[0]"),
        ("merge_method: linear\nmodels: [a]\noverrides: [{match: '(', parameters: {normalize: true}}]", "overrides[0].match"),
        ("merge_method: linear\nmodels: [a]\noverrides: [{layers: [3, 1], parameters: {normalize: true}}]", "overrides[0].layers"),
    ],
)
def test_bad_recipes_name_the_key(text: str, key: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, source="r.yaml")
    assert err.value.key == key
    assert f"key '{key}'" in str(err.value) and "r.yaml" in str(err.value)


def test_not_yaml_reports_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("merge_method: linear\nmodels: [a\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_recipe(p)


def test_missing_file_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "none.yaml")


def test_gradient_conditional_and_override_precedence() -> None:
    r = parse_recipe(
        """
merge_method: task_arithmetic
base_model: b
models:
  - model: a
    parameters: {weight: [0.0, 1.0]}
  - model: c
parameters:
  lambda: [{filter: attn, value: 0.5}, {value: 1.0}]
overrides:
  - {layers: [1, 2], parameters: {normalize: true}}
  - {match: 'head', parameters: {lambda: 2.0}}
"""
    )
    names = ["model.layers.0.mlp.w", "model.layers.1.attn.w", "model.layers.2.mlp.w", "embed.w", "head.w"]
    lm = LayerMap(names)
    p0, p1, p2 = (r.resolve(n, lm) for n in names[:3])
    assert p0 == {"weight": [0.0, 1.0], "lambda": 1.0, "normalize": False}
    assert p1 == {"weight": [0.5, 1.0], "lambda": 0.5, "normalize": True}
    assert p2["weight"] == [1.0, 1.0] and p2["normalize"] is True
    assert r.resolve("embed.w", lm)["weight"] == [0.0, 1.0]  # input side: depth 0
    assert r.resolve("head.w", lm) == {"weight": [1.0, 1.0], "lambda": 2.0, "normalize": False}


def test_alias_and_mergekit_long_model_form(tmp_path: Path) -> None:
    r = parse_recipe(
        "merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: {model: {path: a}, lora: {path: ad}}\nparameters: {scale: 0.4}\n",
        base_dir=tmp_path,
    )
    assert r.models[0].path == (tmp_path / "a").resolve() and r.models[0].lora == (tmp_path / "ad").resolve()
    assert r.resolve("x", LayerMap(["x"]))["lambda"] == 0.4
    plus = parse_recipe("merge_method: task_arithmetic\nbase_model: b\nmodels: [a+ad]\n", base_dir=tmp_path)
    assert plus.models[0].lora == (tmp_path / "ad").resolve()


def test_layer_index_parsing() -> None:
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("h.3.attn.c_attn.weight") == 3
    assert layer_index("down_blocks.1.resnets.0.conv1.weight") == 1
    assert layer_index("lm_head.weight") is None
    assert LayerMap(["l.0.w", "l.5.w", "l.9.w"]).position("l.5.w") == 0.5


def test_mergekit_copy_drops_alloy_keys(tmp_path: Path) -> None:
    r = parse_recipe(MERGEKIT_TIES, base_dir=tmp_path)
    assert r.is_mergekit_compatible()
    import yaml

    data = yaml.safe_load(r.to_mergekit_yaml())
    assert "seed" not in data and data["merge_method"] == "task_arithmetic" and data["parameters"]["lambda"] == 0.8
    r.device = "cuda"
    assert not r.is_mergekit_compatible()
