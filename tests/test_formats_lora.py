"""PEFT LoRA adapters read as the dense fine-tuned model, checked against float64 references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from merging.checkpoint import open_checkpoint
from merging.errors import CheckpointError
from merging.formats.lora import LoraAdapter, match_pattern
from merging.formats.safetensors_file import SafetensorsFile

P = "base_model.model."


def base_tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (10, 6),
        "model.layers.0.self_attn.q_proj.weight": (6, 6),
        "model.layers.0.self_attn.q_proj.bias": (6,),
        "model.layers.0.self_attn.v_proj.weight": (4, 6),
        "model.layers.0.mlp.down_proj.weight": (6, 8),
        "model.conv.weight": (5, 3, 3, 3),
        "model.norm.weight": (6,),
        "score.weight": (3, 6),
    }
    tensors = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    tensors["model.position_ids"] = torch.arange(7, dtype=torch.int64)
    return tensors


def write_base(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return folder


def factors(seed: int = 1) -> dict[str, torch.Tensor]:
    """Hand-made adapter tensors (PEFT key layout), float32."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": r(4, 6),
        f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": r(6, 4),
        f"{P}model.layers.0.self_attn.q_proj.lora_B.bias": r(6),
        f"{P}model.layers.0.self_attn.v_proj.lora_A.weight": r(2, 6),
        f"{P}model.layers.0.self_attn.v_proj.lora_B.weight": r(4, 2),
        f"{P}model.layers.0.mlp.down_proj.lora_A.weight": r(4, 8),
        f"{P}model.layers.0.mlp.down_proj.lora_B.weight": r(6, 4),
        f"{P}model.embed_tokens.lora_embedding_A": r(4, 10),
        f"{P}model.embed_tokens.lora_embedding_B": r(6, 4),
        f"{P}model.conv.lora_A.weight": r(4, 3, 3, 3),
        f"{P}model.conv.lora_B.weight": r(5, 4, 1, 1),
        f"{P}score.weight": r(3, 6),  # modules_to_save: a full tensor
    }


def config(**overrides) -> dict:
    cfg = {
        "peft_type": "LORA",
        "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens", "conv"],
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {"model.layers.0.self_attn.q_proj": 16},
        "modules_to_save": ["score"],
        "lora_bias": True,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "bias": "none",
    }
    cfg.update(overrides)
    return cfg


def write_adapter(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor], *, as_bin: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if as_bin:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


# -- the reference, written independently of the reader (float64, NumPy) --------------------


def ref_scale(cfg: dict, module: str, rank_default: int | None = None) -> float:
    r = cfg["r"]
    for pat, val in cfg.get("rank_pattern", {}).items():
        if module == pat or module.endswith("." + pat):
            r = val
            break
    alpha = cfg["lora_alpha"]
    for pat, val in cfg.get("alpha_pattern", {}).items():
        if module == pat or module.endswith("." + pat):
            alpha = val
            break
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def ref_deltas(cfg: dict, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Base tensor name -> ΔW in float64."""
    t = {k.removeprefix(P): v.double().numpy() for k, v in tensors.items()}
    out: dict[str, np.ndarray] = {}
    for key in t:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            a, b = t[key], t[f"{module}.lora_B.weight"]
            s = ref_scale(cfg, module)
            if a.ndim == 2:
                d = np.einsum("or,ri->oi", b, a) * s
                out[f"{module}.weight"] = d.T if cfg.get("fan_in_fan_out") else d
            else:
                out[f"{module}.weight"] = np.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * s
            if f"{module}.lora_B.bias" in t:
                out[f"{module}.bias"] = t[f"{module}.lora_B.bias"] * s
        elif key.endswith(".lora_embedding_A"):
            module = key.removesuffix(".lora_embedding_A")
            a, b = t[key], t[f"{module}.lora_embedding_B"]
            out[f"{module}.weight"] = np.einsum("dr,rn->nd", b, a) * ref_scale(cfg, module)
    return out


@pytest.fixture()
def base_dir(tmp_path: Path) -> Path:
    return write_base(tmp_path / "base", base_tensors())


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("as_bin", [False, True], ids=["safetensors", "bin"])
def test_get_is_base_plus_reference_delta(tmp_path: Path, base_dir: Path, use_rslora: bool, as_bin: bool) -> None:
    cfg = config(use_rslora=use_rslora)
    tensors = factors()
    adapter = write_adapter(tmp_path / "adapter", cfg, tensors, as_bin=as_bin)
    ck = open_checkpoint(adapter, base=base_dir)
    base = base_tensors()
    assert isinstance(ck, LoraAdapter) and ck.format == "lora"
    assert ck.names() == open_checkpoint(base_dir).names()
    assert {n: (i.shape, i.dtype) for n, i in ck.infos().items()} == {n: (tuple(v.shape), v.dtype) for n, v in base.items()}
    deltas = ref_deltas(cfg, tensors)
    assert set(deltas) == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.embed_tokens.weight", "model.conv.weight",
    }
    for name, b in base.items():
        got = ck.get(name)
        assert got.dtype == b.dtype and got.shape == b.shape
        if name == "score.weight":
            want = tensors[f"{P}score.weight"].double().numpy()
        elif name in deltas:
            want = b.double().numpy() + deltas[name]
        else:
            assert torch.equal(got, b), name
            continue
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5, err_msg=name)
        assert not np.allclose(got.double().numpy(), b.double().numpy(), atol=1e-3), f"{name} did not change"
    assert sorted(ck.adapted_names()) == sorted(deltas)
    assert ck.replaced_names() == ["score.weight"]


def test_scales_follow_rank_and_alpha_patterns(tmp_path: Path, base_dir: Path) -> None:
    ck = open_checkpoint(write_adapter(tmp_path / "a", config(), factors()), base=base_dir)
    q = ck.lora_module("model.layers.0.self_attn.q_proj.weight")
    v = ck.lora_module("model.layers.0.self_attn.v_proj.weight")
    d = ck.lora_module("model.layers.0.mlp.down_proj.weight")
    e = ck.lora_module("model.embed_tokens.weight")
    c = ck.lora_module("model.conv.weight")
    assert (q.rank, q.alpha, q.scale) == (4, 16.0, 4.0)
    assert (v.rank, v.alpha, v.scale) == (2, 8.0, 4.0)
    assert (d.rank, d.scale, d.kind) == (4, 2.0, "linear")
    assert (e.kind, c.kind) == ("embedding", "conv")
    assert ck.lora_module("model.norm.weight") is None


def test_delta_is_the_dense_low_rank_update(tmp_path: Path, base_dir: Path) -> None:
    cfg, tensors = config(), factors()
    ck = open_checkpoint(write_adapter(tmp_path / "a", cfg, tensors), base=base_dir)
    deltas = ref_deltas(cfg, tensors)
    for name in deltas:
        d = ck.delta(name)
        assert d.dtype == torch.float32
        np.testing.assert_allclose(d.double().numpy(), deltas[name], rtol=1e-5, atol=1e-6)
    assert ck.delta("model.norm.weight") is None
    assert ck.delta("score.weight") is None  # replaced, not low-rank


def test_embedding_convention_matches_peft(tmp_path: Path, base_dir: Path) -> None:
    """PEFT's Embedding: A (r, num_embeddings), B (dim, r), ΔW = (B @ A)ᵀ; row i of ΔW is token i's update."""
    tensors = factors()
    ck = open_checkpoint(write_adapter(tmp_path / "a", config(), tensors), base=base_dir)
    a = tensors[f"{P}model.embed_tokens.lora_embedding_A"].double()
    b = tensors[f"{P}model.embed_tokens.lora_embedding_B"].double()
    token = 7
    expected_row = 2.0 * (a[:, token] @ b.T)  # the adapter's forward for one token: (onehot @ Aᵀ) @ Bᵀ · s
    np.testing.assert_allclose(ck.delta("model.embed_tokens.weight")[token].double().numpy(), expected_row.numpy(), rtol=1e-5, atol=1e-6)


def test_conv_convention_matches_peft(tmp_path: Path, base_dir: Path) -> None:
    """PEFT's Conv2d delta for groups == 1 is conv2d(Aᵀ, B)ᵀ·s (A as a batch of inputs, B as a 1x1 kernel)."""
    tensors = factors()
    ck = open_checkpoint(write_adapter(tmp_path / "a", config(), tensors), base=base_dir)
    a = tensors[f"{P}model.conv.lora_A.weight"].double()
    b = tensors[f"{P}model.conv.lora_B.weight"].double()
    peft_style = torch.nn.functional.conv2d(a.transpose(0, 1), b).transpose(0, 1) * 2.0
    torch.testing.assert_close(ck.delta("model.conv.weight").double(), peft_style, rtol=1e-5, atol=1e-6)


def test_fan_in_fan_out_gpt2_conv1d(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    base = {"transformer.h.0.attn.c_attn.weight": torch.randn(6, 18, generator=g), "transformer.wte.weight": torch.randn(9, 6, generator=g)}
    base_dir = write_base(tmp_path / "gpt2", base)
    tensors = {
        f"{P}transformer.h.0.attn.c_attn.lora_A.weight": torch.randn(2, 6, generator=g),
        f"{P}transformer.h.0.attn.c_attn.lora_B.weight": torch.randn(18, 2, generator=g),
    }
    cfg = config(r=2, lora_alpha=3, fan_in_fan_out=True, rank_pattern={}, alpha_pattern={}, lora_bias=False)
    ck = open_checkpoint(write_adapter(tmp_path / "a", cfg, tensors), base=base_dir)
    want = base["transformer.h.0.attn.c_attn.weight"].double().numpy() + ref_deltas(cfg, tensors)["transformer.h.0.attn.c_attn.weight"]
    assert ref_deltas(cfg, tensors)["transformer.h.0.attn.c_attn.weight"].shape == (6, 18)
    np.testing.assert_allclose(ck.get("transformer.h.0.attn.c_attn.weight").double().numpy(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(ck.get("transformer.wte.weight"), base["transformer.wte.weight"])


def test_lora_equals_the_dense_fine_tune_it_came_from(tmp_path: Path, base_dir: Path) -> None:
    """Fine-tune = base + s·B@A written densely; the adapter must read back as that model."""
    cfg = config(alpha_pattern={}, lora_bias=False, modules_to_save=None)  # s = 8 / rank
    tensors = {k: v for k, v in factors().items() if "lora_B.bias" not in k and not k.endswith("score.weight")}
    base = base_tensors()
    fine = dict(base)
    for k, v in tensors.items():
        if k.endswith("lora_A.weight"):
            module = k.removeprefix(P).removesuffix(".lora_A.weight")
            a, b = v, tensors[f"{P}{module}.lora_B.weight"]
            s = 8 / a.shape[0]
            fine[f"{module}.weight"] = base[f"{module}.weight"] + s * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(base[f"{module}.weight"].shape)
        if k.endswith("lora_embedding_A"):
            module = k.removeprefix(P).removesuffix(".lora_embedding_A")
            fine[f"{module}.weight"] = base[f"{module}.weight"] + 8 / v.shape[0] * (tensors[f"{P}{module}.lora_embedding_B"] @ v).T
    dense = open_checkpoint(write_base(tmp_path / "fine", fine))
    adapter = open_checkpoint(write_adapter(tmp_path / "a", cfg, tensors), base=base_dir)
    assert adapter.names() == dense.names()
    for name in dense.names():
        torch.testing.assert_close(adapter.get(name), dense.get(name), rtol=1e-6, atol=1e-6)


def test_bfloat16_base_keeps_its_dtype(tmp_path: Path) -> None:
    base = base_tensors(torch.bfloat16)
    base_dir = write_base(tmp_path / "bf16", base)
    cfg, tensors = config(), factors()
    ck = open_checkpoint(write_adapter(tmp_path / "a", cfg, tensors), base=base_dir)
    name = "model.layers.0.mlp.down_proj.weight"
    got = ck.get(name)
    assert got.dtype == torch.bfloat16
    want = base[name].double().numpy() + ref_deltas(cfg, tensors)[name]
    # one bfloat16 rounding of the float32 sum: within half an ulp (2**-8 relative) plus float32 noise
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2**-8, atol=1e-6)


def test_base_names_with_an_extra_prefix_are_matched_by_suffix(tmp_path: Path) -> None:
    base = {f"model.{k}": v for k, v in base_tensors().items()}  # e.g. a wrapper that adds "model."
    base_dir = write_base(tmp_path / "prefixed", base)
    cfg, tensors = config(), factors()
    ck = open_checkpoint(write_adapter(tmp_path / "a", cfg, tensors), base=base_dir)
    name = "model.model.layers.0.mlp.down_proj.weight"
    want = base[name].double().numpy() + ref_deltas(cfg, tensors)["model.layers.0.mlp.down_proj.weight"]
    np.testing.assert_allclose(ck.get(name).double().numpy(), want, rtol=1e-5, atol=1e-5)
    assert ck.replaced_names() == ["model.score.weight"]


def test_base_names_without_the_adapter_prefix_are_matched(tmp_path: Path) -> None:
    base = {k.removeprefix("model."): v for k, v in base_tensors().items()}  # a bare LlamaModel
    base_dir = write_base(tmp_path / "bare", base)
    cfg, tensors = config(), factors()
    ck = open_checkpoint(write_adapter(tmp_path / "a", cfg, tensors), base=base_dir)
    want = base["layers.0.self_attn.v_proj.weight"].double().numpy() + ref_deltas(cfg, tensors)["model.layers.0.self_attn.v_proj.weight"]
    np.testing.assert_allclose(ck.get("layers.0.self_attn.v_proj.weight").double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_saved_base_layer_tensors_replace_the_base_and_still_get_the_delta(tmp_path: Path, base_dir: Path) -> None:
    """With `bias: lora_only` PEFT saves `<module>.base_layer.bias`; lora_B.bias then moves that saved bias."""
    cfg, tensors = config(), factors()
    saved_bias = torch.randn(6, generator=torch.Generator().manual_seed(9))
    tensors[f"{P}model.layers.0.self_attn.q_proj.base_layer.bias"] = saved_bias
    ck = open_checkpoint(write_adapter(tmp_path / "a", cfg, tensors), base=base_dir)
    name = "model.layers.0.self_attn.q_proj.bias"
    assert sorted(ck.replaced_names()) == sorted(["score.weight", name])
    want = saved_bias.double().numpy() + ref_deltas(cfg, tensors)[name]
    np.testing.assert_allclose(ck.get(name).double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_pattern_rule_is_a_dotted_suffix_and_first_wins() -> None:
    cfg_path = Path("adapter_config.json")
    assert match_pattern({"v_proj": 2}, "model.layers.0.self_attn.v_proj", cfg_path) == 2
    assert match_pattern({"v_proj": 2}, "v_proj", cfg_path) == 2
    assert match_pattern({"v_proj": 2}, "model.layers.0.xv_proj", cfg_path) is None
    assert match_pattern({r"layers\.0\..*": 8, "v_proj": 2}, "model.layers.0.self_attn.v_proj", cfg_path) == 8
    with pytest.raises(CheckpointError, match="regular expression"):
        match_pattern({"(": 1}, "x", cfg_path)


def test_opening_reads_no_tensor_data(tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    real = SafetensorsFile._load
    monkeypatch.setattr(SafetensorsFile, "_load", lambda self, name: loads.append(name) or real(self, name))
    ck = open_checkpoint(write_adapter(tmp_path / "a", config(), factors()), base=base_dir)
    assert loads == []
    ck.get("model.layers.0.self_attn.v_proj.weight")
    assert sorted(loads) == sorted([
        "model.layers.0.self_attn.v_proj.weight",
        f"{P}model.layers.0.self_attn.v_proj.lora_A.weight",
        f"{P}model.layers.0.self_attn.v_proj.lora_B.weight",
    ])


def test_adapter_uses_the_base_folder_and_lists_all_files(tmp_path: Path, base_dir: Path) -> None:
    adapter = write_adapter(tmp_path / "a", config(), factors())
    ck = open_checkpoint(adapter, base=open_checkpoint(base_dir))
    assert ck.path == adapter and ck.folder == base_dir and ck.architecture() == "LlamaForCausalLM"
    assert ck.files() == [adapter / "adapter_config.json", adapter / "adapter_model.safetensors", base_dir / "model.safetensors"]


def test_base_found_from_an_absolute_path_in_the_config(tmp_path: Path, base_dir: Path) -> None:
    adapter = write_adapter(tmp_path / "a", config(base_model_name_or_path=str(base_dir)), factors())
    ck = open_checkpoint(adapter)
    assert ck.base.path == base_dir / "model.safetensors"


# -- errors ---------------------------------------------------------------------------------


def open_error(adapter: Path, base) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(adapter, base=base)
    return info.value


def test_rank_differs_from_the_config(tmp_path: Path, base_dir: Path) -> None:
    adapter = write_adapter(tmp_path / "a", config(r=8, rank_pattern={"v_proj": 2}), factors())
    err = open_error(adapter, base_dir)
    assert err.path == adapter / "adapter_model.safetensors" and str(base_dir) in str(err)
    assert "rank mismatch" in str(err) and "r=8" in str(err)
    assert err.tensor is not None and "lora_A" in err.tensor


def test_rank_of_a_and_b_disagree(tmp_path: Path, base_dir: Path) -> None:
    tensors = factors()
    tensors[f"{P}model.layers.0.mlp.down_proj.lora_B.weight"] = torch.randn(6, 3)
    err = open_error(write_adapter(tmp_path / "a", config(), tensors), base_dir)
    assert "rank mismatch" in str(err) and str(base_dir) in str(err)
    assert err.tensor == f"{P}model.layers.0.mlp.down_proj.lora_A.weight"


def test_factors_that_do_not_fit_the_base_shape(tmp_path: Path, base_dir: Path) -> None:
    tensors = factors()
    tensors[f"{P}model.layers.0.mlp.down_proj.lora_B.weight"] = torch.randn(7, 4)
    err = open_error(write_adapter(tmp_path / "a", config(), tensors), base_dir)
    assert "shape mismatch" in str(err) and "(7, 8)" in str(err) and "(6, 8)" in str(err)
    assert err.path == tmp_path / "a" / "adapter_model.safetensors" and str(base_dir) in str(err)


def test_target_missing_from_the_base(tmp_path: Path, base_dir: Path) -> None:
    tensors = factors()
    tensors[f"{P}model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.randn(4, 6)
    tensors[f"{P}model.layers.0.self_attn.k_proj.lora_B.weight"] = torch.randn(6, 4)
    err = open_error(write_adapter(tmp_path / "a", config(), tensors), base_dir)
    assert err.tensor == f"{P}model.layers.0.self_attn.k_proj.lora_A.weight"
    assert "k_proj.weight" in str(err) and str(base_dir) in str(err) and "adapter_model.safetensors" in str(err)


def test_ambiguous_suffix_match(tmp_path: Path) -> None:
    base = {"encoder.block.q.weight": torch.ones(3, 3), "decoder.block.q.weight": torch.ones(3, 3)}
    base_dir = write_base(tmp_path / "b", base)
    tensors = {f"{P}block.q.lora_A.weight": torch.ones(1, 3), f"{P}block.q.lora_B.weight": torch.ones(3, 1)}
    err = open_error(write_adapter(tmp_path / "a", config(r=1, rank_pattern={}, alpha_pattern={}), tensors), base_dir)
    assert "several" in str(err) and "encoder.block.q.weight" in str(err) and err.tensor == f"{P}block.q.lora_A.weight"


def test_a_factor_without_its_partner(tmp_path: Path, base_dir: Path) -> None:
    tensors = factors()
    del tensors[f"{P}model.layers.0.mlp.down_proj.lora_B.weight"]
    err = open_error(write_adapter(tmp_path / "a", config(), tensors), base_dir)
    assert "no lora_B" in str(err)


def test_dora_is_refused(tmp_path: Path, base_dir: Path) -> None:
    err = open_error(write_adapter(tmp_path / "a", config(use_dora=True), factors()), base_dir)
    assert "DoRA" in str(err) and err.path == tmp_path / "a" / "adapter_config.json"
    tensors = factors()
    tensors[f"{P}model.layers.0.mlp.down_proj.lora_magnitude_vector"] = torch.ones(6)
    err = open_error(write_adapter(tmp_path / "b", config(), tensors), base_dir)
    assert "DoRA" in str(err)


@pytest.mark.parametrize("overrides, fragment", [
    ({"peft_type": "IA3"}, "IA3"),
    ({"init_lora_weights": "pissa_niter_4"}, "residual"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
])
def test_other_non_additive_adapters_are_refused(tmp_path: Path, base_dir: Path, overrides: dict, fragment: str) -> None:
    err = open_error(write_adapter(tmp_path / "a", config(**overrides), factors()), base_dir)
    assert fragment in str(err)


def test_missing_base_names_the_configured_base(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a", config(), factors())
    err = open_error(adapter, None)
    assert "meta-llama/Llama-2-7b-hf" in str(err) and err.path == adapter
    err = open_error(adapter, tmp_path / "nowhere")
    assert "meta-llama/Llama-2-7b-hf" in str(err) and str(tmp_path / "nowhere") in str(err)


def test_a_base_that_is_itself_an_adapter(tmp_path: Path, base_dir: Path) -> None:
    first = write_adapter(tmp_path / "first", config(), factors())
    second = write_adapter(tmp_path / "second", config(), factors(seed=2))
    err = open_error(second, first)
    assert "itself a LoRA adapter" in str(err)
    err = open_error(second, open_checkpoint(first, base=base_dir))
    assert "itself a LoRA adapter" in str(err)


def test_adapter_folder_without_weights(tmp_path: Path, base_dir: Path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config()))
    err = open_error(folder, base_dir)
    assert "adapter_model.safetensors" in str(err) and err.path == folder


def test_full_tensor_with_the_wrong_shape(tmp_path: Path, base_dir: Path) -> None:
    tensors = factors()
    tensors[f"{P}score.weight"] = torch.ones(4, 6)
    err = open_error(write_adapter(tmp_path / "a", config(), tensors), base_dir)
    assert err.tensor == f"{P}score.weight" and "(3, 6)" in str(err)

