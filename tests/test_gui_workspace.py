"""The window's data model without a window: checkpoint summaries, base guessing, recipe mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_family, write_model

from app.workspace import (
    ROLE_BASE,
    ROLE_FINETUNED,
    STATUS_ERROR,
    STATUS_READY,
    MergeSettings,
    ModelEntry,
    apply_base_guess,
    build_recipe,
    from_recipe,
    guess_base,
    human_bytes,
    human_seconds,
    inspect_checkpoint,
    set_role,
    switch_method,
)
from merging.errors import AlloyError, RecipeError
from merging.recipe import Override, load_recipe


def test_inspect_summarises_a_folder(tmp_path: Path) -> None:
    base, _ = random_family(1)
    folder = write_model(tmp_path / "m", base, {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    entry = inspect_checkpoint(folder)
    assert entry.status == STATUS_READY
    assert entry.format == "safetensors"
    assert entry.num_params == sum(t.numel() for t in base.values())
    assert entry.dtypes == {"float32": 6, "int64": 1}
    assert entry.dtype_label == "float32 + int64"
    assert entry.architecture == "LlamaForCausalLM"
    assert entry.size_bytes == (folder / "model.safetensors").stat().st_size  # the weight files
    assert entry.layer_count == 2  # layers.0 and layers.1


def test_inspect_a_bad_file_returns_the_readers_message(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")  # header length past the end
    entry = inspect_checkpoint(bad)
    assert entry.status == STATUS_ERROR
    assert str(bad) in entry.error
    assert "Traceback" not in entry.error


def test_inspect_refuses_what_is_no_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AlloyError, match="not a checkpoint"):
        inspect_checkpoint(text)


def test_base_is_guessed_from_the_others_configs(tmp_path: Path) -> None:
    base, fts = random_family(2)
    b = write_model(tmp_path / "llama-base", base, {"_name_or_path": "org/llama-base"})
    f1 = write_model(tmp_path / "ft-a", fts[0], {"_name_or_path": "org/llama-base"})
    f2 = write_model(tmp_path / "ft-b", fts[1], {"base_model": str(b)})
    entries = [inspect_checkpoint(p) for p in (f1, b, f2)]
    assert guess_base(entries) == 1
    assert apply_base_guess(entries) == 1
    assert [e.role for e in entries] == [ROLE_FINETUNED, ROLE_BASE, ROLE_FINETUNED]


def test_no_guess_when_nothing_names_another_model(tmp_path: Path) -> None:
    base, fts = random_family(1)
    entries = [inspect_checkpoint(write_model(tmp_path / n, sd)) for n, sd in (("a", base), ("b", fts[0]))]
    assert guess_base(entries) is None


def test_a_chosen_role_is_never_guessed_over(tmp_path: Path) -> None:
    base, fts = random_family(1)
    b = write_model(tmp_path / "base", base)
    f = write_model(tmp_path / "ft", fts[0], {"base_model": "base"})
    entries = [inspect_checkpoint(b), inspect_checkpoint(f)]
    set_role(entries, 1, ROLE_BASE)
    apply_base_guess(entries)
    assert [e.role for e in entries] == [ROLE_FINETUNED, ROLE_BASE]


def test_one_base_at_most() -> None:
    entries = [ModelEntry(Path(f"/m{i}")) for i in range(3)]
    set_role(entries, 0, ROLE_BASE)
    set_role(entries, 2, ROLE_BASE)
    assert [e.role for e in entries] == [ROLE_FINETUNED, ROLE_FINETUNED, ROLE_BASE]


def test_recipe_from_rows_and_back(tmp_path: Path) -> None:
    entries = [
        ModelEntry(tmp_path / "base", role=ROLE_BASE),
        ModelEntry(tmp_path / "a", parameters={"weight": 0.5}),
        ModelEntry(tmp_path / "adapter", lora_base=tmp_path / "other-base"),
    ]
    settings = MergeSettings(method="ties", parameters={"density": [0.1, 0.4], "lambda": 0.8}, seed=3, out_dtype="bfloat16",
                             overrides=[Override({"density": 0.9}, match="embed", layers=(0, 3))])
    recipe = build_recipe(entries, settings)
    data = recipe.to_dict()
    assert data["merge_method"] == "ties"
    assert data["base_model"] == str(tmp_path / "base")
    assert data["models"] == [
        {"model": str(tmp_path / "a"), "parameters": {"weight": 0.5}},
        {"model": f"{tmp_path / 'other-base'}+{tmp_path / 'adapter'}"},
    ]
    assert data["parameters"] == {"density": [0.1, 0.4], "lambda": 0.8}
    assert data["overrides"] == [{"match": "embed", "layers": [0, 3], "parameters": {"density": 0.9}}]
    assert data["seed"] == 3 and data["out_dtype"] == "bfloat16"
    path = tmp_path / "r.yaml"
    recipe.save(path)
    loaded = load_recipe(path)
    rows, again = from_recipe(loaded)
    assert build_recipe(rows, again).to_dict() == loaded.to_dict() == data


def test_methods_that_need_a_base_say_so(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="needs a base model"):
        build_recipe([ModelEntry(tmp_path / "a"), ModelEntry(tmp_path / "b")], MergeSettings(method="ties"))
    with pytest.raises(RecipeError, match="add checkpoints"):
        build_recipe([], MergeSettings(method="linear"))


def test_switching_method_keeps_shared_parameters() -> None:
    settings = MergeSettings(method="ties", parameters={"density": 0.3, "lambda": 0.7, "trim_rule": "exact"},
                             overrides=[Override({"density": 0.5}, match="x"), Override({"trim_rule": "exact"}, match="y")])
    switch_method(settings, "task_arithmetic")
    assert settings.parameters == {"lambda": 0.7}
    assert settings.overrides == []
    switch_method(settings, "dare_linear")
    assert settings.parameters == {"lambda": 0.7}


@pytest.mark.parametrize(("n", "text"), [(512, "512 B"), (1500, "1.5 KB"), (2_500_000_000, "2.5 GB")])
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_human_seconds() -> None:
    assert human_seconds(3.21) == "3.2 s"
    assert human_seconds(75) == "75 s"
    assert human_seconds(3725) == "1 h 02 min"
    assert human_seconds(None) == "…"


def test_adapter_without_base_names_the_base(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "base_model_name_or_path": "org/some-base",
                                                             "target_modules": ["w"]}))
    from safetensors.torch import save_file

    save_file({"base_model.model.layers.0.w.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.layers.0.w.lora_B.weight": torch.zeros(8, 2)}, str(folder / "adapter_model.safetensors"))
    entry = inspect_checkpoint(folder)
    assert entry.is_adapter and entry.status == STATUS_ERROR
    assert "org/some-base" in entry.error
    assert "org/some-base" in entry.references
