"""Bad inputs through the `alloy` command line: exit code 1, one line on stderr naming the file.

The generated corpus (`formats_corpus.py`, shared with the reader tests) is driven
through `alloy inspect` and `alloy merge`; inputs that are only wrong together
(tensor sets, shapes, NaN/Inf, LoRA adapters against their base) through
`alloy merge`. A few cases also run as a real `python -m merging.cli` process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.cli import main
from merging.export import STAGING_PREFIX

try:
    from . import formats_corpus as corpus
except ImportError:
    import formats_corpus as corpus

ROOT = Path(__file__).resolve().parents[1]
CASES = corpus.all_cases()
PEFT = "base_model.model."


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, *, names: Path, tensor: str | None = None, fragment: str | None = None) -> str:
    assert rc == 1, err
    assert err.startswith("alloy: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert str(names) in err, err
    if tensor is not None:
        assert f"tensor '{tensor}'" in err, err
    if fragment is not None:
        assert fragment in err, err
    return err


def write_linear_recipe(folder: Path, *models: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(f"merge_method: linear\nmodels: {json.dumps([str(m) for m in models])}\n")
    return path


def no_output(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX)]


# -- the corpus, through inspect and merge ---------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus_case_through_inspect_and_merge(case: corpus.BadInput, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = tmp_path / "case"
    cases.mkdir()
    expect = case.build(cases)

    rc, out, err = run_cli(["inspect", expect.open], capsys)
    assert_one_line_error(rc, err, names=expect.names, tensor=expect.tensor, fragment=expect.message)
    assert out == ""

    recipe = write_linear_recipe(tmp_path, expect.open, expect.open)
    rc, out, err = run_cli(["merge", recipe, "-o", tmp_path / "out", "-q"], capsys)
    assert_one_line_error(rc, err, names=expect.names, tensor=expect.tensor, fragment=expect.message)
    no_output(tmp_path, tmp_path / "out")
    if expect.must_not_exist is not None:
        assert not expect.must_not_exist.exists(), "the pickle's code ran"


@pytest.mark.parametrize("case_id", ["truncated-at-9", "legacy-torch-format-runs-code", "dotdot"])
def test_corpus_case_as_a_real_process(case_id: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == case_id)
    cases = tmp_path / "case"
    cases.mkdir()
    expect = case.build(cases)
    recipe = write_linear_recipe(tmp_path, expect.open, expect.open)
    proc = subprocess.run(
        [sys.executable, "-m", "merging.cli", "merge", str(recipe), "-o", str(tmp_path / "out"), "-q"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )
    assert_one_line_error(proc.returncode, proc.stderr, names=expect.names, tensor=expect.tensor, fragment=expect.message)
    assert proc.stdout == ""
    no_output(tmp_path, tmp_path / "out")
    if expect.must_not_exist is not None:
        assert not expect.must_not_exist.exists(), "the pickle's code ran"


# -- inputs that are wrong together -------------------------------------------------------------


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed.weight": torch.randn(10, 6, generator=g),
        "model.layers.0.q_proj.weight": torch.randn(6, 6, generator=g),
        "model.layers.0.v_proj.weight": torch.randn(4, 6, generator=g),
        "model.norm.weight": torch.randn(6, generator=g),
        "model.position_ids": torch.arange(7),
    }


def write_model(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.fixture()
def family(tmp_path: Path) -> Path:
    write_model(tmp_path / "base", tensors(0))
    write_model(tmp_path / "ft0", tensors(1))
    write_model(tmp_path / "ft1", tensors(2))
    return tmp_path


def merge_family(family: Path, capsys: pytest.CaptureFixture, *, models: str = "[ft0, ft1]", extra: str = "") -> tuple[int, str, str]:
    (family / "r.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: base\nmodels: {models}\n{extra}")
    return run_cli(["merge", family / "r.yaml", "-o", family / "out", "-q"], capsys)


@pytest.mark.parametrize(
    ("change", "tensor", "fragment"),
    [
        (lambda s: s.pop("model.layers.0.v_proj.weight"), "model.layers.0.v_proj.weight", "missing"),
        (lambda s: s.__setitem__("model.norm.weight", torch.ones(7)), "model.norm.weight", "shape [7] differs from [6]"),
        (lambda s: s["model.layers.0.q_proj.weight"].__setitem__((2, 3), float("nan")), "model.layers.0.q_proj.weight", "NaN"),
        (lambda s: s["model.embed.weight"].__setitem__((0, 0), float("-inf")), "model.embed.weight", "Inf"),
        (lambda s: s.__setitem__("model.norm.weight", s["model.norm.weight"].to(torch.int32)), "model.norm.weight", "dtype"),
    ],
    ids=["different-tensor-sets", "different-shapes", "nan", "inf", "int-where-float"],
)
def test_models_that_do_not_fit_together(family: Path, capsys: pytest.CaptureFixture, change, tensor: str, fragment: str) -> None:
    state = tensors(2)
    change(state)
    write_model(family / "ft1", state)
    rc, _, err = merge_family(family, capsys)
    assert_one_line_error(rc, err, names=family / "ft1", tensor=tensor, fragment=fragment)
    no_output(family, family / "out")


def test_extra_tensors_in_a_fine_tune_are_a_warning_not_an_error(family: Path, capsys: pytest.CaptureFixture) -> None:
    state = tensors(2)
    state["lm_head.extra"] = torch.ones(3)
    write_model(family / "ft1", state)
    rc, out, err = merge_family(family, capsys)
    assert rc == 0 and "lm_head.extra" in err and err.startswith("warning: ")
    assert "lm_head.extra" not in load_file(str(family / "out" / "model.safetensors"))


def test_zero_sized_and_scalar_tensors_merge(family: Path, capsys: pytest.CaptureFixture) -> None:
    states = [tensors(i) for i in range(3)]
    for i, s in enumerate(states):
        s["model.empty"] = torch.zeros(0, 4)
        s["model.scale"] = torch.tensor(1.0 + i)
        write_model(family / ("base" if i == 0 else f"ft{i - 1}"), s)
    rc, out, err = merge_family(family, capsys, extra="parameters: {lambda: 0.5}\n")
    assert rc == 0, err
    got = load_file(str(family / "out" / "model.safetensors"))
    assert got["model.empty"].shape == (0, 4)
    assert got["model.scale"].shape == () and got["model.scale"].item() == pytest.approx(1.0 + 0.5 * (1.0 + 2.0))
    assert torch.equal(got["model.position_ids"], torch.arange(7))


# -- LoRA adapters -----------------------------------------------------------------------------


def write_adapter(folder: Path, *, r: int = 2, rank_in_file: int = 2, target: str = "model.layers.0.q_proj") -> Path:
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": [target.rsplit(".", 1)[-1]],
           "base_model_name_or_path": "some/base"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(3)
    save_file(
        {
            f"{PEFT}{target}.lora_A.weight": torch.randn(rank_in_file, 6, generator=g),
            f"{PEFT}{target}.lora_B.weight": torch.randn(6, rank_in_file, generator=g),
        },
        str(folder / "adapter_model.safetensors"),
    )
    return folder


@pytest.mark.parametrize(
    ("kwargs", "fragment", "tensor_part"),
    [
        ({"r": 8, "rank_in_file": 2}, "rank", "lora_A"),
        ({"target": "model.layers.0.k_proj"}, "k_proj", "k_proj.lora_A"),
    ],
    ids=["wrong-rank", "target-not-in-base"],
)
def test_lora_adapter_that_does_not_fit_its_base(family: Path, capsys: pytest.CaptureFixture, kwargs: dict, fragment: str, tensor_part: str) -> None:
    adapter = write_adapter(family / "adapter", **kwargs)
    weights = adapter / "adapter_model.safetensors"
    rc, _, err = run_cli(["inspect", adapter, "--base", family / "base"], capsys)
    assert_one_line_error(rc, err, names=weights, fragment=fragment)
    assert tensor_part in err and str(family / "base") in err
    rc, _, err = merge_family(family, capsys, models=f"[ft0, 'base+adapter']")
    assert_one_line_error(rc, err, names=weights, fragment=fragment)
    no_output(family, family / "out")


def test_a_base_that_is_itself_a_lora_adapter(family: Path, capsys: pytest.CaptureFixture) -> None:
    first = write_adapter(family / "first")
    second = write_adapter(family / "second")
    rc, _, err = run_cli(["inspect", second, "--base", first], capsys)
    assert_one_line_error(rc, err, names=second, fragment="itself a LoRA adapter")
    rc, _, err = merge_family(family, capsys, models="[ft0, 'first+second']")
    assert_one_line_error(rc, err, names=first, fragment="LoRA adapter")  # the recipe's base of `second` is an adapter
    no_output(family, family / "out")


def test_a_lora_adapter_without_a_base(family: Path, capsys: pytest.CaptureFixture) -> None:
    adapter = write_adapter(family / "adapter")
    rc, _, err = run_cli(["inspect", adapter], capsys)
    assert_one_line_error(rc, err, names=adapter, fragment="some/base")
