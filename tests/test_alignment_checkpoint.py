"""Aligned and interpolated checkpoints: lazy, one tensor at a time, same names, shapes and dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merging.alignment import (
    AlignedCheckpoint,
    InterpolatedCheckpoint,
    align_checkpoint,
    align_models,
    apply_permutations,
    invert_permutation,
    load_spec,
    random_permutations,
)
from merging.checkpoint import Checkpoint, TensorInfo
from merging.errors import AlloyError, CheckpointError


class DictCheckpoint(Checkpoint):
    """An in-memory checkpoint that counts reads."""

    format = "memory"

    def __init__(self, path: str, tensors: dict[str, torch.Tensor]):
        super().__init__(path)
        self.tensors = tensors
        self._infos = {n: TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()}
        self.reads: list[str] = []

    def _load(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        return self.tensors[name].clone()


def mlp_state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "layers.0.weight": torch.randn(16, 8, generator=g), "layers.0.bias": torch.randn(16, generator=g),
        "layers.2.weight": torch.randn(12, 16, generator=g), "layers.2.bias": torch.randn(12, generator=g),
        "layers.4.weight": torch.randn(3, 12, generator=g), "layers.4.bias": torch.randn(3, generator=g),
    }
    return {n: t.to(dtype) for n, t in sd.items()}


def test_aligned_checkpoint_recovers_a_shuffled_model_and_streams():
    a = mlp_state(0)
    spec = load_spec("mlp", {n: tuple(t.shape) for n, t in a.items()})
    perms = random_permutations(spec, spec.validate({n: tuple(t.shape) for n, t in a.items()}), seed=2)
    ref = DictCheckpoint("/m/a", a)
    other = DictCheckpoint("/m/b", apply_permutations(spec, a, perms))
    aligned, result = align_checkpoint(ref, other, "mlp", seed=0)
    # Matching read only the cost tensors (the output bias has no permuted axis).
    assert sorted(other.reads) == sorted(spec.cost_tensors())
    assert "layers.4.bias" not in other.reads
    other.reads.clear()
    assert aligned.names() == ref.names() and aligned.infos() == other.infos()
    for name in a:
        assert torch.equal(aligned.get(name), a[name])
        assert other.reads[-1] == name  # read when asked, one at a time
    assert len(other.reads) == len(a)
    assert torch.equal(result.perms["P_layers.0"], invert_permutation(perms["P_layers.0"]))
    assert result.to_dict()["spec"] == "mlp"


def test_aligned_checkpoint_keeps_dtypes():
    a, b = mlp_state(0, torch.bfloat16), mlp_state(1, torch.bfloat16)
    b["step"] = torch.tensor(3)
    a["step"] = torch.tensor(3)
    aligned, _ = align_checkpoint(DictCheckpoint("/a", a), DictCheckpoint("/b", b), load_spec("mlp", {n: tuple(t.shape) for n, t in a.items() if n != "step"}))
    for name in b:
        t = aligned.get(name)
        assert t.dtype == b[name].dtype and tuple(t.shape) == tuple(b[name].shape)
    assert torch.equal(aligned.get("step"), b["step"])


def test_bad_permutations_are_refused():
    a = mlp_state(0)
    spec = load_spec("mlp", {n: tuple(t.shape) for n, t in a.items()})
    with pytest.raises(AlloyError, match="P_layers.2"):
        AlignedCheckpoint(DictCheckpoint("/a", a), spec, {"P_layers.0": torch.arange(16)})
    with pytest.raises(AlloyError, match="not a permutation"):
        AlignedCheckpoint(DictCheckpoint("/a", a), spec, {"P_layers.0": torch.zeros(16, dtype=torch.long), "P_layers.2": torch.arange(12)})


def test_other_model_shape_mismatch_names_file_and_tensor():
    a, b = mlp_state(0), mlp_state(1)
    b["layers.4.weight"] = torch.zeros(3, 12)
    b["layers.2.bias"] = torch.zeros(11)
    with pytest.raises(CheckpointError) as err:
        align_checkpoint(DictCheckpoint("/m/a", a), DictCheckpoint("/m/b", b), "mlp")
    assert err.value.tensor == "layers.2.bias" and "/m/b" in str(err.value)


def test_interpolated_checkpoint_matches_plain_arithmetic():
    a, b = mlp_state(0, torch.float16), mlp_state(1, torch.float16)
    a["count"] = torch.tensor(5)
    b["count"] = torch.tensor(9)
    mixed = InterpolatedCheckpoint(DictCheckpoint("/a", a), DictCheckpoint("/b", b), 0.25)
    for name in a:
        got = mixed.get(name)
        if name == "count":
            assert int(got) == 5
            continue
        expected = (0.75 * a[name].double() + 0.25 * b[name].double()).to(torch.float16)
        assert got.dtype == torch.float16
        assert torch.allclose(got.double(), expected.double(), atol=1e-3, rtol=0)
    with pytest.raises(AlloyError, match="alpha"):
        InterpolatedCheckpoint(DictCheckpoint("/a", a), DictCheckpoint("/b", b), 1.5)


def test_align_models_keeps_the_reference_and_aligns_the_rest():
    a = mlp_state(0)
    spec = load_spec("mlp", {n: tuple(t.shape) for n, t in a.items()})
    sizes = spec.validate({n: tuple(t.shape) for n, t in a.items()})
    ref = DictCheckpoint("/m/a", a)
    others = [DictCheckpoint(f"/m/{i}", apply_permutations(spec, a, random_permutations(spec, sizes, seed=i))) for i in range(2)]
    stages = []
    out, results = align_models(ref, [ref, *others], spec, progress=lambda s, d, t: stages.append(s))
    assert out[0] is ref and results[0] is None
    for ck in out[1:]:
        assert isinstance(ck, AlignedCheckpoint)
        for name in a:
            assert torch.equal(ck.get(name), a[name])
    assert any(s.startswith("align model 2") for s in stages)


def test_folder_and_config_come_from_the_wrapped_checkpoint(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"architectures": ["AlloyDigitsMLP"]}')
    a = mlp_state(0)
    ck = DictCheckpoint(str(tmp_path / "model.safetensors"), a)
    spec = load_spec("mlp", {n: tuple(t.shape) for n, t in a.items()})
    sizes = spec.validate({n: tuple(t.shape) for n, t in a.items()})
    aligned = AlignedCheckpoint(ck, spec, {g: torch.arange(n) for g, n in sizes.items()})
    assert aligned.folder == tmp_path and aligned.architecture() == "AlloyDigitsMLP"
