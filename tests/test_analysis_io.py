"""The analysis as a job: cache, progress, cancellation, retention after a merge, alignment, CLI, PNG figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_model
from merging.analysis import AnalysisResult, alignment_similarity, analyze, analyze_recipe
from merging.analysis import interference as interference_module
from merging.analysis.result import RecipeAnalysis
from merging.checkpoint import open_checkpoint
from merging.errors import AlloyError, CheckpointError, MergeCancelled
from merging.progress import CancelToken
from merging.recipe import load_recipe
from test_analysis_reference import dyadic_family, open_family

SHAPES = {"embed.weight": (30, 12), "layers.0.w": (12, 12), "layers.0.b": (12,), "layers.1.w": (10, 12), "head.w": (4, 10)}


def _folders(tmp_path: Path, n: int = 3, seed: int = 0) -> tuple[Path, list[Path], dict, list[dict]]:
    base, models = dyadic_family(n, seed=seed, shapes=SHAPES)
    b = write_model(tmp_path / "base", base)
    ms = [write_model(tmp_path / f"ft{i}", m) for i, m in enumerate(models)]
    return b, ms, base, models


class _ReadSpy:
    """Counts tensor reads through the analysis (and can forbid them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, forbid: bool = False):
        self.count = 0
        real = interference_module.read_values

        def spy(ckpt, name, sample):  # type: ignore[no-untyped-def]
            self.count += 1
            if forbid:
                raise AssertionError(f"read {name} from {ckpt.path}")
            return real(ckpt, name, sample)

        monkeypatch.setattr(interference_module, "read_values", spy)


def test_cache_hit_returns_the_same_result_without_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b, ms, _, _ = _folders(tmp_path)
    cache = tmp_path / "cache"
    first = analyze(open_checkpoint(b), [open_checkpoint(m) for m in ms], cache_dir=cache)
    assert len(list(cache.glob("*.json"))) == 1
    with monkeypatch.context() as mp:
        spy = _ReadSpy(mp, forbid=True)
        again = analyze(open_checkpoint(b), [open_checkpoint(m) for m in ms], cache_dir=cache, labels=["a", "b", "c"])
        assert spy.count == 0
    assert again.model_labels == ["a", "b", "c"]
    again.model_labels = first.model_labels
    assert again.to_json() == first.to_json()

    # other parameters: a miss; a touched file: a miss
    spy = _ReadSpy(monkeypatch)
    analyze(open_checkpoint(b), [open_checkpoint(m) for m in ms], cache_dir=cache, densities=[0.3])
    assert spy.count > 0
    reads = spy.count
    st = os.stat(ms[1] / "model.safetensors")
    os.utime(ms[1] / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    analyze(open_checkpoint(b), [open_checkpoint(m) for m in ms], cache_dir=cache)
    assert spy.count > reads
    assert len(list(cache.glob("*.json"))) == 3


def test_memory_checkpoints_are_not_cached(tmp_path: Path) -> None:
    base, models = dyadic_family(2, seed=1, shapes=SHAPES)
    b, ms = open_family(base, models)
    analyze(b, ms, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.json"))


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_progress_events_count_to_the_end(scope: str) -> None:
    base, models = dyadic_family(2, seed=2, shapes=SHAPES)
    b, ms = open_family(base, models)
    events = []
    analyze(b, ms, scope=scope, progress=events.append)
    assert {e.stage for e in events} == {"analyze"}
    passes = 1 if scope == "tensor" else 5
    assert events[-1].done == events[-1].total == len(SHAPES) * passes
    assert events[-1].fraction == 1.0
    dones = [e.done for e in events]
    assert dones == sorted(dones)
    assert any("pass 1/" in e.message for e in events)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_cancel_raises_merge_cancelled(scope: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = dyadic_family(2, seed=3, shapes=SHAPES)
    b, ms = open_family(base, models)
    token = CancelToken()
    seen = []

    def cancel_after_two(ev) -> None:  # type: ignore[no-untyped-def]
        seen.append(ev)
        if ev.done >= 2:
            token.cancel()

    with pytest.raises(MergeCancelled):
        analyze(b, ms, scope=scope, progress=cancel_after_two, cancel=token)
    assert max(e.done for e in seen) == 2
    # a token cancelled before the start: nothing is read
    spy = _ReadSpy(monkeypatch)
    early = CancelToken()
    early.cancel()
    with pytest.raises(MergeCancelled):
        analyze(b, ms, cancel=early)
    assert spy.count == 0


def test_bad_inputs_get_clear_errors() -> None:
    base, models = dyadic_family(2, seed=4, shapes=SHAPES)
    models[1]["layers.0.w"][2, 3] = float("nan")
    b, ms = open_family(base, models)
    with pytest.raises(CheckpointError) as err:
        analyze(b, ms)
    assert err.value.tensor == "layers.0.w" and "ft1" in str(err.value)
    with pytest.raises(AlloyError, match="densities must lie in"):
        analyze(b, ms[:1], densities=[0.0, 0.5])
    with pytest.raises(AlloyError, match="at least one"):
        analyze(b, [])
    models[0]["head.w"] = torch.zeros(3, 3)
    b, ms = open_family(base, models)
    with pytest.raises(CheckpointError):
        analyze(b, ms)  # NaN is still in ft1; the shape mismatch of ft0's head is skipped, not fatal
    models[1]["layers.0.w"][2, 3] = 0.0
    b, ms = open_family(base, models)
    result = analyze(b, ms)
    assert "head.w" in result.skipped and "differs" in result.skipped["head.w"]


def test_grown_vocabulary_is_compared_on_the_base_rows() -> None:
    base, models = dyadic_family(2, seed=5, shapes=SHAPES)
    grown = dict(models[0])
    grown["embed.weight"] = torch.cat([models[0]["embed.weight"], torch.randn(6, 12)])
    b, ms = open_family(base, [grown, models[1]])
    ref_b, ref_ms = open_family(base, models)
    np.testing.assert_array_equal(analyze(b, ms).gram, analyze(ref_b, ref_ms).gram)


def _ties_recipe(tmp_path: Path, b: Path, ms: list[Path]) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "merge_method: ties\n"
        f"base_model: {b}\n"
        "models:\n" + "".join(f"  - model: {m}\n" for m in ms) +
        "parameters:\n  density: 0.3\n  scope: tensor\n"
    )
    return recipe


def test_retention_from_a_merged_folder_and_from_a_dry_run_agree_with_numpy(tmp_path: Path) -> None:
    from merging.executor import run_merge

    b, ms, base, models = _folders(tmp_path)
    recipe_path = _ties_recipe(tmp_path, b, ms)
    recipe = load_recipe(recipe_path)
    run_merge(recipe, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    from_folder = analyze(open_checkpoint(b), [open_checkpoint(m) for m in ms], merged=open_checkpoint(tmp_path / "merged"))
    dry = analyze_recipe(recipe, retention=True)
    assert dry.interference is not None and dry.density == pytest.approx(0.3)
    assert dry.interference.scope == "tensor"
    assert 0.3 in dry.interference.densities
    assert dry.interference.retention_source.startswith("dry-run merge")
    np.testing.assert_allclose(dry.interference.retention("layer"), from_folder.retention("layer"), rtol=1e-9, atol=1e-12)
    # NumPy: cos(merged − base, model − base) per layer
    for li, label in enumerate(from_folder.layer_labels):
        names = [n for n, l in zip(from_folder.tensor_names, from_folder.tensor_layer) if l == li]
        tm = np.concatenate([(merged[n].double() - base[n].double()).numpy().reshape(-1) for n in names])
        for i, m in enumerate(models):
            ti = np.concatenate([(m[n].double() - base[n].double()).numpy().reshape(-1) for n in names])
            want = tm @ ti / (np.linalg.norm(tm) * np.linalg.norm(ti))
            assert from_folder.retention("layer")[li, i] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_alignment_similarity_matches_numpy_and_improves_after_matching(demo_workspace) -> None:
    from merging.alignment import align_checkpoint

    ws = demo_workspace
    ref, other = open_checkpoint(ws.mlp_seed_a), open_checkpoint(ws.mlp_seed_b)
    aligned, match = align_checkpoint(ref, other, "mlp", seed=0)
    result = alignment_similarity(ref, other, aligned, match=match)
    for li, label in enumerate(result.layer_labels):
        names = [n for n, l in zip(result.tensor_names, result.tensor_layer) if l == li]
        a = np.concatenate([ref.get(n).double().numpy().reshape(-1) for n in names])
        b = np.concatenate([other.get(n).double().numpy().reshape(-1) for n in names])
        c = np.concatenate([aligned.get(n).double().numpy().reshape(-1) for n in names])
        assert result.cosine_before("layer")[li] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-12)
        assert result.cosine_after("layer")[li] == pytest.approx(a @ c / np.linalg.norm(a) / np.linalg.norm(c), rel=1e-12)
        assert result.distance_after("layer")[li] == pytest.approx(np.linalg.norm(a - c), rel=1e-9)
    assert float(result.cosine_after("overall")) > float(result.cosine_before("overall")) + 0.05
    assert result.match["groups"] and all(0.0 <= g["moved"] <= 1.0 for g in result.match["groups"])
    assert result.match["objective_after"] >= result.match["objective_before"]
    again = type(result).from_json(result.to_json())
    np.testing.assert_array_equal(again.dot_after, result.dot_after)


def test_recipe_analysis_json_round_trip(tmp_path: Path) -> None:
    b, ms, _, _ = _folders(tmp_path, n=2)
    analysis = analyze_recipe(load_recipe(_ties_recipe(tmp_path, b, ms)))
    again = RecipeAnalysis.from_json(analysis.to_json())
    assert isinstance(again.interference, AnalysisResult)
    assert again.to_json() == analysis.to_json()
    assert again.merge_method == "ties" and again.density == pytest.approx(0.3)


def _png_size(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct colours) of a PNG, read with Qt."""
    from PySide6.QtGui import QImage

    img = QImage(str(path))
    assert not img.isNull(), path
    ptr = img.convertToFormat(QImage.Format.Format_RGB32).constBits()
    arr = np.frombuffer(ptr, dtype=np.uint32, count=img.width() * img.height())
    return img.width(), img.height(), int(np.unique(arr).size)


def test_cli_writes_json_and_readable_pngs(demo_workspace, tmp_path: Path, capsys) -> None:
    from merging.cli import main

    out = tmp_path / "out"
    rc = main(["analyze", str(demo_workspace.recipe), "--json", str(out / "analysis.json"), "--plots", str(out / "plots"),
               "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert rc == 0
    data = RecipeAnalysis.load(out / "analysis.json")
    assert data.interference is not None and data.interference.has_retention  # small model: retention on by default
    assert data.density == pytest.approx(0.2)
    names = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert names == sorted(["cosine.png", "cosine_layers.png", "norms.png", "sign_conflict_density.png", "sign_conflict_layers.png",
                            "magnitudes.png", "pcb_scores.png", "pcb_kept.png", "retention.png"])
    for name in names:
        w, h, colours = _png_size(out / "plots" / name)
        assert (w, h) == ((860, 620) if name == "cosine.png" else (1000, 620)), name
        assert colours > 20, name  # text, lines and fills, not a blank picture
    rc = main(["analyze", str(demo_workspace.recipe), "--no-retention", "--sample-size", "0"])
    assert rc == 1
    assert "--sample-size must be at least 1" in capsys.readouterr().err


def test_cli_summary_and_error_without_base(tmp_path: Path, capsys) -> None:
    from merging.cli import main

    b, ms, _, _ = _folders(tmp_path, n=2)
    rc = main(["analyze", str(_ties_recipe(tmp_path, b, ms)), "--no-cache", "--density", "0.3", "--exact"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cosine similarity of task vectors" in out and "sign conflict at density 0.3" in out
    linear = tmp_path / "linear.yaml"
    linear.write_text(f"merge_method: linear\nmodels:\n  - model: {ms[0]}\n  - model: {ms[1]}\n")
    assert main(["analyze", str(linear), "--no-cache"]) == 1
    assert "nothing to analyse" in capsys.readouterr().err


def test_render_pngs_for_alignment_results(demo_workspace, tmp_path: Path) -> None:
    from app.plots import render_analysis_pngs
    from merging.alignment import align_checkpoint

    ws = demo_workspace
    ref, other = open_checkpoint(ws.mlp_seed_a), open_checkpoint(ws.mlp_seed_b)
    aligned, match = align_checkpoint(ref, other, "mlp", seed=0)
    files = render_analysis_pngs(alignment_similarity(ref, other, aligned, match=match), tmp_path / "p")
    assert [f.name for f in files] == ["alignment.png"]
    w, h, colours = _png_size(files[0])
    assert (w, h) == (1000, 620) and colours > 20


def test_recipe_with_alignment_and_no_base_gives_alignment_results(demo_workspace, tmp_path: Path) -> None:
    from merging.cli import main

    ws = demo_workspace
    recipe = tmp_path / "align.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {ws.mlp_seed_a}\n  - model: {ws.mlp_seed_b}\nalignment:\n  spec: mlp\n")
    analysis = analyze_recipe(load_recipe(recipe))
    assert analysis.interference is None and len(analysis.alignments) == 1
    al = analysis.alignments[0]
    assert (al.reference_label, al.other_label) == ("mlp_seed_a", "mlp_seed_b")
    assert float(al.cosine_after("overall")) > float(al.cosine_before("overall"))
    rc = main(["analyze", str(recipe), "--plots", str(tmp_path / "plots"), "--json", str(tmp_path / "a.json"), "--no-cache", "-q"])
    assert rc == 0
    assert [p.name for p in (tmp_path / "plots").glob("*.png")] == ["alignment.png"]
    assert RecipeAnalysis.load(tmp_path / "a.json").alignments[0].tensor_names == al.tensor_names
