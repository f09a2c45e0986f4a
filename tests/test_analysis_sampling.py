"""Sampling: which parameters are read, reading only those, and how close the estimates are to the exact numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import write_model
from merging.analysis import analyze, plan_sample, read_values
from merging.analysis.result import LOG_MIN, LOG_STEP
from merging.checkpoint import open_checkpoint
from test_analysis_reference import dyadic_family, open_family


def test_plan_is_seeded_sorted_and_covers_whole_blocks() -> None:
    a = plan_sample("w", 10_000, 1000, block=64, seed=3)
    again = plan_sample("w", 10_000, 1000, block=64, seed=3)
    other = plan_sample("w", 10_000, 1000, block=64, seed=4)
    other_name = plan_sample("v", 10_000, 1000, block=64, seed=3)
    np.testing.assert_array_equal(a.index, again.index)
    assert not np.array_equal(a.index, other.index) and not np.array_equal(a.index, other_name.index)
    assert np.all(np.diff(a.index) > 0) and a.index[0] >= 0 and a.index[-1] < 10_000
    blocks = np.unique(a.index // 64)
    assert blocks.size == 16  # ceil(1000 / 64) blocks of 64
    assert a.weight == pytest.approx(157 / 16)  # ceil(10000 / 64) blocks in the tensor / blocks drawn
    small = plan_sample("b", 500, 1000, block=64, seed=3)
    assert small.index is None and small.weight == 1.0 and small.size == 500
    assert plan_sample("w", 10_000, None).exact


def test_every_parameter_is_equally_likely_to_be_drawn() -> None:
    numel, size, block, runs = 1003, 100, 10, 600
    hits = np.zeros(numel)
    for seed in range(runs):
        hits[plan_sample("t", numel, size, block=block, seed=seed).index] += 1
    freq = hits / runs
    expected = 10 / 101  # 10 of the 101 blocks (the last one has 3 elements) per draw
    assert freq.mean() == pytest.approx(expected, rel=0.03)
    # binomial spread: 5 standard deviations
    assert np.abs(freq - expected).max() < 5 * np.sqrt(expected * (1 - expected) / runs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sampled_reads_of_safetensors_use_the_map_and_equal_get(tmp_path, monkeypatch, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(300, 70, generator=g).to(dtype), "b.bias": torch.randn(70, generator=g).to(dtype)}
    ckpt = open_checkpoint(write_model(tmp_path / "m", tensors))
    sample = plan_sample("a.weight", 21_000, 2000, block=16, seed=1)
    want = tensors["a.weight"].reshape(-1)[torch.from_numpy(sample.index)].float()
    from merging.formats.safetensors_file import SafetensorsFile

    def no_full_reads(self, name):  # the memory map must answer, not a whole-tensor read
        raise AssertionError("whole tensor read")

    monkeypatch.setattr(SafetensorsFile, "_load", no_full_reads)
    got = read_values(ckpt, "a.weight", sample)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sampled_reads_of_sharded_folders(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    t1 = {"x.weight": torch.randn(200, 50, generator=g)}
    t2 = {"y.weight": torch.randn(80, 50, generator=g).to(torch.bfloat16)}
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file(t1, str(folder / "model-00001-of-00002.safetensors"))
    save_file(t2, str(folder / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 0}, "weight_map": {"x.weight": "model-00001-of-00002.safetensors",
                                                             "y.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(folder)
    for name, t in (("x.weight", t1["x.weight"]), ("y.weight", t2["y.weight"])):
        sample = plan_sample(name, t.numel(), 500, block=8, seed=0)
        torch.testing.assert_close(read_values(ckpt, name, sample), t.reshape(-1)[torch.from_numpy(sample.index)].float(), rtol=0, atol=0)


def test_sampled_reads_of_a_lora_adapter_add_the_delta_at_the_sampled_positions(tmp_path, monkeypatch) -> None:
    g = torch.Generator().manual_seed(2)
    base_t = {"model.proj.weight": torch.randn(96, 64, generator=g).to(torch.bfloat16), "model.norm.weight": torch.ones(64)}
    base_dir = write_model(tmp_path / "base", base_t)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    r, alpha = 4, 8
    save_file({"base_model.model.model.proj.lora_A.weight": torch.randn(r, 64, generator=g) * 0.1,
               "base_model.model.model.proj.lora_B.weight": torch.randn(96, r, generator=g) * 0.1},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["proj"],
                                                             "base_model_name_or_path": str(base_dir)}))
    lora = open_checkpoint(adapter, base=open_checkpoint(base_dir))
    full = lora.get("model.proj.weight").reshape(-1).float()
    sample = plan_sample("model.proj.weight", 96 * 64, 640, block=32, seed=5)
    from merging.formats.lora import LoraAdapter

    monkeypatch.setattr(LoraAdapter, "_load", lambda self, name: (_ for _ in ()).throw(AssertionError("whole tensor read")))
    got = read_values(lora, "model.proj.weight", sample)
    torch.testing.assert_close(got, full[torch.from_numpy(sample.index)], rtol=0, atol=0)
    # an un-adapted tensor is the base's
    s2 = plan_sample("model.norm.weight", 64, 16, block=4, seed=0)
    torch.testing.assert_close(read_values(lora, "model.norm.weight", s2), torch.ones(s2.size))


def test_sampled_sums_and_thresholds_are_the_weighted_sample_ones() -> None:
    """NumPy reference of the sampled estimators: Σ over the sample × weight, and the weighted order statistic."""
    shapes = {"w1": (64, 300), "w2": (128, 100), "b": (50,)}
    base, models = dyadic_family(2, seed=4, shapes=shapes)
    b, ms = open_family(base, models)
    densities = [0.1, 0.3]
    result = analyze(b, ms, densities=densities, exact=False, sample_size=2000, block_size=40, seed=9, scope="tensor")
    assert result.sampled and result.sample_size == 2000
    for t, name in enumerate(result.tensor_names):
        sample = plan_sample(name, base[name].numel(), 2000, block=40, seed=9)
        idx = slice(None) if sample.index is None else sample.index
        x = np.stack([(m[name].double().numpy().reshape(-1) - base[name].double().numpy().reshape(-1))[idx] for m in models])
        assert result.analysed[t] == x.shape[1]
        np.testing.assert_allclose(result.gram[t], sample.weight * (x @ x.T), rtol=1e-12)
        np.testing.assert_allclose(result.zeros[t], sample.weight * (x == 0).sum(1), rtol=1e-12)
        D = base[name].numel()
        for i in range(2):
            srt = np.sort(np.abs(x[i]))
            for k, d in enumerate(densities):
                pos = D - int(D * d) - 1  # official rule, position in the whole tensor
                want = srt[min(srt.size - 1, int(np.floor(pos / sample.weight)))]
                assert result.trim_thresholds[t, i, k] == want
                kept = ((np.abs(x[i]) >= want) & (x[i] != 0)).sum() * sample.weight
                assert result.kept[t, i, k] == pytest.approx(kept, rel=1e-12)
            a = np.abs(x[i][x[i] != 0])
            hist = np.bincount(np.floor((np.log10(a) - LOG_MIN) / LOG_STEP).astype(int), minlength=1700) * sample.weight
            start = result.magnitude_hist_start
            got = np.zeros(1700)
            got[start:start + result.magnitude_hist.shape[-1]] = result.magnitude_hist[result.tensor_layer[t], i]
            if np.sum(result.tensor_layer == result.tensor_layer[t]) == 1:
                np.testing.assert_allclose(got, hist, rtol=1e-12)


# Tolerances of the sampled estimates on a model where the exact numbers are computable: 740k parameters
# per model, 8192 sampled per tensor (about 5 %), four seeds. Whole-model numbers:
TOLERANCE = {
    "cosine": 0.02,  # absolute
    "norm": 0.02,  # relative
    "sign_conflict": 0.03,  # absolute, rate in [0, 1], at densities with >= 1000 contested parameters in the sample
    "kept_fraction": 0.003,  # absolute
    "discarded_mass": 0.01,  # absolute
    "threshold": 0.03,  # relative
    "pcb_kept": 0.004,  # absolute
    "pcb_negative": 0.01,  # absolute
}
# Per layer (about 8k sampled parameters per layer): cosine 0.05, norm 5 %, kept fraction 0.02, sign
# conflict 0.08 where the layer has at least 10,000 contested parameters (about 500 in the sample).


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_sampled_estimates_are_within_the_stated_tolerance_of_the_exact_values(scope: str) -> None:
    shapes = {f"layers.{i}.w": (384, 384) for i in range(4)} | {f"layers.{i}.b": (384,) for i in range(4)} | {"embed.weight": (800, 192)}
    base, models = dyadic_family(3, seed=21, shapes=shapes, correlated=0.3, zeros=0.02)
    b, ms = open_family(base, models)
    dens = [0.05, 0.1, 0.2, 0.5, 1.0]
    ex = analyze(b, ms, densities=dens, scope=scope, exact=True)
    for seed in range(4):
        sm = analyze(b, ms, densities=dens, scope=scope, exact=False, sample_size=8192, seed=seed)
        assert sm.sampled and sm.analysed_params < 0.06 * sm.total_params
        np.testing.assert_allclose(sm.cosine(), ex.cosine(), atol=TOLERANCE["cosine"])
        np.testing.assert_allclose(sm.norms(), ex.norms(), rtol=TOLERANCE["norm"])
        in_sample = ex.contested.sum(0) * sm.analysed_params / sm.total_params
        enough = in_sample >= 1000
        assert enough.sum() >= 4
        np.testing.assert_allclose(sm.sign_conflict()[enough], ex.sign_conflict()[enough], atol=TOLERANCE["sign_conflict"])
        np.testing.assert_allclose(sm.kept_fraction(), ex.kept_fraction(), atol=TOLERANCE["kept_fraction"])
        np.testing.assert_allclose(sm.discarded_mass_fraction(), ex.discarded_mass_fraction(), atol=TOLERANCE["discarded_mass"])
        for i in range(3):
            for d in dens[:-1]:
                assert sm.threshold_for(i, d) == pytest.approx(ex.threshold_for(i, d), rel=TOLERANCE["threshold"])
        np.testing.assert_allclose(sm.pcb_kept_fraction(), ex.pcb_kept_fraction(), atol=TOLERANCE["pcb_kept"])
        np.testing.assert_allclose(sm.pcb_negative_fraction(), ex.pcb_negative_fraction(), atol=TOLERANCE["pcb_negative"])
        np.testing.assert_allclose(sm.cosine("layer"), ex.cosine("layer"), atol=0.05)
        np.testing.assert_allclose(sm.norms("layer"), ex.norms("layer"), rtol=0.05)
        np.testing.assert_allclose(sm.kept_fraction("layer"), ex.kept_fraction("layer"), atol=0.02)
        busy = ex._s(ex.contested, "layer") >= 10_000
        assert busy.sum() >= 10
        np.testing.assert_allclose(sm.sign_conflict("layer")[busy], ex.sign_conflict("layer")[busy], atol=0.08)


def test_sampled_demo_models_are_close_to_exact(demo_workspace) -> None:
    ws = demo_workspace
    base = open_checkpoint(ws.base)
    models = [open_checkpoint(f) for f in ws.finetunes.values()]
    ex = analyze(base, models, exact=True)
    # 26k parameters per model, 4096 sampled per tensor (about 36 %). The head layer's few large changes
    # dominate the dot products, so the tolerance is wider than on the synthetic model.
    for seed in range(3):
        sm = analyze(base, models, exact=False, sample_size=4096, seed=seed)
        assert sm.sampled and sm.analysed_params < 0.4 * sm.total_params
        np.testing.assert_allclose(sm.cosine(), ex.cosine(), atol=0.05)
        np.testing.assert_allclose(sm.norms(), ex.norms(), rtol=0.05)
        assert sm.sign_conflict_at(0.2) == pytest.approx(ex.sign_conflict_at(0.2), abs=0.03)
        np.testing.assert_allclose(sm.pcb_kept_fraction(), ex.pcb_kept_fraction(), atol=0.01)


def test_an_analysis_leaves_no_file_mapped(tmp_path) -> None:
    from merging.analysis import sampling

    base, models = dyadic_family(2, seed=6, shapes={"w": (200, 200)})
    b = open_checkpoint(write_model(tmp_path / "b", base))
    ms = [open_checkpoint(write_model(tmp_path / f"m{i}", m)) for i, m in enumerate(models)]
    result = analyze(b, ms, exact=False, sample_size=1000)
    assert result.sampled and result.analysed[0] == 1008  # ceil(1000 / 16) blocks of 16
    assert not sampling._maps
