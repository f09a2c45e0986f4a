"""`alloy align`: writes the aligned model (any reader can open it), one-line errors, demo pairs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_model
from merging import cli_align
from merging.alignment import apply_permutations, load_spec, random_permutations
from merging.cli import main


def mlp_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.weight": torch.randn(16, 8, generator=g), "layers.0.bias": torch.randn(16, generator=g),
        "layers.2.weight": torch.randn(4, 16, generator=g), "layers.2.bias": torch.randn(4, generator=g),
    }


@pytest.fixture()
def shuffled_pair(tmp_path: Path):
    a = mlp_state(0)
    spec = load_spec("mlp", {n: tuple(t.shape) for n, t in a.items()})
    perms = random_permutations(spec, spec.validate({n: tuple(t.shape) for n, t in a.items()}), seed=3)
    write_model(tmp_path / "a", a, {"architectures": ["TinyMLP"]})
    write_model(tmp_path / "b", apply_permutations(spec, a, perms), {"architectures": ["TinyMLP"], "note": "b"})
    return tmp_path, a, perms


def test_align_writes_the_aligned_model(shuffled_pair, capsys):
    root, a, perms = shuffled_pair
    rc = main(["align", "--spec", "mlp", str(root / "a"), str(root / "b"), "-o", str(root / "out"), "-q",
               "--write-spec", str(root / "spec.yaml")])
    assert rc == 0
    out = load_file(str(root / "out" / "model.safetensors"))
    for name, t in a.items():
        assert torch.equal(out[name], t)
    assert json.loads((root / "out" / "config.json").read_text())["note"] == "b"
    report = json.loads((root / "out" / "alignment.json").read_text())
    assert report["converged"] and report["seed"] == 0 and len(report["objectives"]) == report["rounds"] + 1
    assert "with spec mlp" in capsys.readouterr().out
    assert load_spec(root / "spec.yaml", {n: tuple(t.shape) for n, t in a.items()}).axes["layers.2.weight"] == (None, "P_layers.0")
    assert sorted(report["groups"]) == sorted(perms)


def test_align_with_alpha_writes_the_interpolation(shuffled_pair):
    root, a, _ = shuffled_pair
    assert main(["align", "--spec", "mlp", str(root / "a"), str(root / "b"), "-o", str(root / "mid"), "-q", "--alpha", "0.5"]) == 0
    out = load_file(str(root / "mid" / "model.safetensors"))
    for name, t in a.items():
        assert torch.allclose(out[name], t, atol=1e-6)  # aligned B equals A, so the midpoint is A
    assert json.loads((root / "mid" / "alignment.json").read_text())["alpha"] == 0.5


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--spec", "resnet"], "torchvision naming"),
        (["--spec", "nope.yaml"], "neither a built-in spec"),
        (["--spec", "vit"], "embeddings.patch_embeddings"),
        (["--spec", "mlp", "--alpha", "2"], "--alpha"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(shuffled_pair, capsys, extra, needle):
    root, _, _ = shuffled_pair
    rc = main(["align", str(root / "a"), str(root / "b"), "-o", str(root / "out"), *extra])
    err = capsys.readouterr().err
    assert rc == 1
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (root / "out").exists()


def test_shape_mismatch_names_the_tensor(tmp_path, capsys):
    a, b = mlp_state(0), mlp_state(1)
    b["layers.2.weight"] = torch.zeros(4, 12)
    b["layers.0.weight"] = torch.zeros(12, 8)
    b["layers.0.bias"] = torch.zeros(12)
    write_model(tmp_path / "a", a)
    write_model(tmp_path / "b", b)
    rc = main(["align", "--spec", "mlp", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "layers.0.weight" in err and str(tmp_path / "b") in err


def test_register_and_run_standalone(shuffled_pair, capsys):
    root, _, _ = shuffled_pair
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli_align.register(sub)
    args = parser.parse_args(["align", "--spec", "gpt2", str(root / "a"), str(root / "b"), "-o", str(root / "o")])
    assert cli_align.run(args) == 1
    assert "gpt2 spec expects" in capsys.readouterr().err


def test_demo_pairs_align_and_keep_their_function(demo_workspace, tmp_path):
    """The demo's independently trained MLPs and ResNets: the aligned copy scores exactly like the original."""
    from merging.demo_models import evaluate, load_state

    for pair, spec in (("mlp", "mlp"), ("cnn", "resnet")):
        a, b = getattr(demo_workspace, f"{pair}_seed_a"), getattr(demo_workspace, f"{pair}_seed_b")
        out = tmp_path / pair
        assert main(["align", "--spec", spec, str(a), str(b), "-o", str(out), "-q"]) == 0
        before, after = evaluate(b), evaluate(out)
        assert after["accuracy"] == before["accuracy"]
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5)
        report = json.loads((out / "alignment.json").read_text())
        assert report["objectives"][-1] > report["objectives"][0]
        aligned = load_state(out)
        assert any(not torch.equal(aligned[n], t) for n, t in load_state(b).items())


def test_merge_recipe_with_alignment_section(demo_workspace, tmp_path):
    """`alloy merge` with `alignment: {spec: mlp}`: a linear merge of A and π(B), computed here by hand."""
    from merging.alignment import interpolate, weight_matching
    from merging.demo_models import evaluate, load_state

    a_dir, b_dir = demo_workspace.mlp_seed_a, demo_workspace.mlp_seed_b
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {a_dir}\n  - model: {b_dir}\nalignment: {{spec: mlp, seed: 0}}\n")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 0
    a, b = load_state(a_dir), load_state(b_dir)
    spec = load_spec("mlp", {n: tuple(t.shape) for n, t in a.items()})
    expected = interpolate(a, apply_permutations(spec, b, weight_matching(spec, a, b, seed=0).perms), 0.5)
    merged = load_state(tmp_path / "out")
    for name, t in expected.items():
        torch.testing.assert_close(merged[name], t, rtol=1e-6, atol=1e-6)
    naive = interpolate(a, b, 0.5)
    assert evaluate(merged)["loss"] < evaluate(naive)["loss"]
