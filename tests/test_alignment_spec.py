"""Permutation specs: files, fused axes, and errors that name the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merging.alignment import (
    AttentionGroup,
    PermutationSpec,
    apply_permutations,
    load_spec,
    write_spec_file,
)
from merging.errors import CheckpointError, RecipeError

SHAPES = {"fc0.weight": (5, 3), "fc0.bias": (5,), "fc1.weight": (2, 5), "fc1.bias": (2,)}


def test_builtin_spec_round_trips_through_yaml_and_json(tmp_path: Path):
    spec = load_spec("mlp", SHAPES)
    for name in ("spec.yaml", "spec.json"):
        write_spec_file(spec, tmp_path / name)
        again = load_spec(tmp_path / name, SHAPES)
        assert again.axes == spec.axes
    text = (tmp_path / "spec.yaml").read_text()
    assert "fc0.weight: [P_fc0, null]" in text


def test_hand_written_yaml_with_fused_axis_and_attention(tmp_path: Path):
    (tmp_path / "s.yaml").write_text(
        "tensors:\n"
        "  attn.qkv.weight: [[qk, qk, vo], res]\n"
        "  attn.out.weight: [res, vo]\n"
        "  embed.weight: [null, res]\n"
        "attention:\n"
        "  - {qk: qk, vo: vo, num_heads: 2, permute_heads: true}\n"
    )
    shapes = {"attn.qkv.weight": (12, 6), "attn.out.weight": (6, 4), "embed.weight": (9, 6)}
    spec = load_spec(tmp_path / "s.yaml", shapes)
    assert spec.axes["attn.qkv.weight"] == (("qk", "qk", "vo"), "res")
    assert spec.attention == (AttentionGroup("qk", "vo", 2),)
    assert spec.validate(shapes) == {"res": 6, "vo": 4, "qk": 4}
    refs = spec.perm_to_axes(spec.validate(shapes))
    assert [(r.tensor, r.axis, r.offset, r.size) for r in refs["qk"]] == [("attn.qkv.weight", 0, 0, 4), ("attn.qkv.weight", 0, 4, 4)]


def test_fused_axis_is_permuted_segment_by_segment():
    """Reference: permute Q, K, V blocks separately with plain indexing, then concatenate."""
    spec = PermutationSpec({"qkv": (("qk", "qk", "vo"), None)})
    w = torch.arange(10 * 3, dtype=torch.float64).reshape(10, 3)
    perms = {"qk": torch.tensor([2, 0, 1]), "vo": torch.tensor([3, 1, 0, 2])}
    got = apply_permutations(spec, {"qkv": w}, perms)["qkv"]
    q, k, v = w[0:3], w[3:6], w[6:10]
    expected = torch.cat([q[[2, 0, 1]], k[[2, 0, 1]], v[[3, 1, 0, 2]]])
    assert torch.equal(got, expected)


def test_missing_tensor_is_named():
    spec = PermutationSpec({"fc0.weight": ("P", None), "fc9.weight": (None, "P")})
    with pytest.raises(CheckpointError) as err:
        spec.validate(SHAPES, "/models/a")
    assert err.value.tensor == "fc9.weight"
    assert "fc9.weight" in str(err.value) and "/models/a" in str(err.value)


def test_axis_size_mismatch_is_named():
    spec = PermutationSpec({"fc0.weight": ("P", None), "fc1.weight": ("P", None)})
    with pytest.raises(CheckpointError) as err:
        spec.validate(SHAPES)
    assert err.value.tensor == "fc1.weight"
    assert "size 2" in str(err.value) and "size 5" in str(err.value) and "fc0.weight" in str(err.value)


def test_wrong_number_of_axes_is_named():
    spec = PermutationSpec({"fc0.bias": ("P", None)})
    with pytest.raises(CheckpointError, match="fc0.bias"):
        spec.validate(SHAPES)


def test_group_on_two_axes_of_one_tensor_is_refused():
    spec = PermutationSpec({"sq.weight": ("P", "P")})
    with pytest.raises(RecipeError, match="sq.weight"):
        spec.validate({"sq.weight": (4, 4)})


def test_heads_must_divide_the_group():
    spec = PermutationSpec({"q": ("qk", None), "v": ("vo", None)}, (AttentionGroup("qk", "vo", 3),))
    with pytest.raises(CheckpointError, match="not a multiple of 3 heads"):
        spec.validate({"q": (8, 2), "v": (9, 2)})


def test_bad_spec_files(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("tensors: {fc0.weight: 3}\n")
    with pytest.raises(RecipeError, match="tensors.fc0.weight"):
        load_spec(tmp_path / "a.yaml", SHAPES)
    (tmp_path / "b.json").write_text(json.dumps({"tensors": {}, "extra": 1}))
    with pytest.raises(RecipeError, match="extra"):
        load_spec(tmp_path / "b.json", SHAPES)
    (tmp_path / "c.yaml").write_text("tensors: [\n")
    with pytest.raises(RecipeError, match="does not parse"):
        load_spec(tmp_path / "c.yaml", SHAPES)
    with pytest.raises(RecipeError, match="neither a built-in spec"):
        load_spec(tmp_path / "nope.yaml", SHAPES)


def test_mlp_spec_errors_name_the_tensor():
    with pytest.raises(CheckpointError) as err:
        load_spec("mlp", {"a.weight": (5, 3), "b.weight": (2, 4)})
    assert err.value.tensor == "b.weight"
    with pytest.raises(CheckpointError) as err:
        load_spec("mlp", {**SHAPES, "norm.scale": (5,)})
    assert err.value.tensor == "norm.scale"
