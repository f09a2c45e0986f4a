"""Sharded Hugging Face folders (safetensors and torch) and single-file folders (diffusers-style too)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merging.checkpoint import open_checkpoint
from merging.errors import CheckpointError
from merging.formats import safetensors_file
from merging.formats.safetensors_file import SafetensorsFile
from merging.formats.sharded import ShardedSafetensors, ShardedTorchPickle
from merging.formats.torch_pickle import TorchPickleFile

try:
    from . import formats_corpus as corpus
except ImportError:
    import formats_corpus as corpus


def split_in_shards(tensors: dict[str, torch.Tensor], n: int, stem: str, suffix: str) -> dict[str, dict[str, torch.Tensor]]:
    names = list(tensors)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(n):
        file = f"{stem}-{i + 1:05d}-of-{n:05d}{suffix}"
        shards[file] = {k: tensors[k] for k in names[i::n]}
    return shards


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], *, torch_format: bool = False, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = ("pytorch_model", ".bin") if torch_format else ("model", ".safetensors")
    shards = split_in_shards(tensors, n, stem, suffix)
    weight_map = {}
    for file, part in shards.items():
        if torch_format:
            torch.save(part, folder / file)
        else:
            save_file(part, str(folder / file))
        weight_map.update({k: file for k in part})
    index_name = "pytorch_model.bin.index.json" if torch_format else "model.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return folder


@pytest.mark.parametrize("torch_format", [False, True], ids=["safetensors", "torch"])
def test_sharded_round_trip(tmp_path: Path, torch_format: bool) -> None:
    tensors = corpus.roundtrip_tensors()
    folder = write_sharded(tmp_path / "model", tensors, torch_format=torch_format)
    ck = open_checkpoint(folder)
    expected_type = ShardedTorchPickle if torch_format else ShardedSafetensors
    assert isinstance(ck, expected_type)
    assert ck.format == ("torch-sharded" if torch_format else "safetensors-sharded")
    assert sorted(ck.names()) == sorted(tensors)
    for name, want in tensors.items():
        got = ck.get(name)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert ck.folder == folder and ck.path == folder
    assert ck.architecture() == "LlamaForCausalLM"
    assert ck.files()[0].name.endswith(".index.json") and len(ck.files()) == 4
    assert ck.index_metadata()["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert ck.shard_of("counts").name.startswith("pytorch_model-" if torch_format else "model-")
    ck.close()


def test_sharded_names_are_grouped_by_shard(tmp_path: Path) -> None:
    tensors = {f"layers.{i}.w": torch.full((2,), float(i)) for i in range(9)}
    ck = open_checkpoint(write_sharded(tmp_path / "m", tensors))
    shards = [ck.shard_of(n).name for n in ck.names()]
    assert shards == sorted(shards)


def test_opening_a_sharded_folder_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_sharded(tmp_path / "m", {f"w{i}": torch.randn(64, 64) for i in range(6)})
    mapped = []  # files whose tensor data was read
    real = safetensors_file.SafetensorsFile._read_copy
    monkeypatch.setattr(
        safetensors_file.SafetensorsFile, "_read_copy", lambda self, *a: mapped.append(self.path) or real(self, *a)
    )
    read_headers = []
    real_read_header = safetensors_file.read_header
    monkeypatch.setattr(safetensors_file, "read_header", lambda p: read_headers.append(Path(p).name) or real_read_header(p))
    ck = open_checkpoint(folder)
    assert mapped == []
    assert sorted(read_headers) == sorted(p.name for p in folder.glob("model-*.safetensors"))
    ck.get("w4")
    assert [Path(m).name for m in mapped] == [ck.shard_of("w4").name]


def test_sharded_index_mentioned_by_file_path(tmp_path: Path) -> None:
    folder = write_sharded(tmp_path / "m", {"a": torch.ones(2), "b": torch.zeros(2)}, n=2)
    ck = open_checkpoint(folder / "model.safetensors.index.json")
    assert isinstance(ck, ShardedSafetensors) and sorted(ck.names()) == ["a", "b"]


def test_tensors_a_shard_holds_but_the_index_omits_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.ones(2), "stray": torch.zeros(2)}, str(folder / "s1.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    with caplog.at_level(logging.WARNING):
        ck = open_checkpoint(folder)
    assert ck.names() == ["a"]
    assert "stray" in caplog.text
    with pytest.raises(CheckpointError, match="no such tensor"):
        ck.get("stray")


def test_shards_in_a_subfolder_and_symlinked_blobs_are_fine(tmp_path: Path) -> None:
    """Hub cache snapshots link every file to a blob outside the snapshot folder; that is not an escape."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"a": torch.ones(2)}, str(blobs / "1234abcd"))
    folder = tmp_path / "snapshots" / "rev"
    (folder / "sub").mkdir(parents=True)
    save_file({"b": torch.full((2,), 3.0)}, str(folder / "sub" / "s2.safetensors"))
    os.symlink(blobs / "1234abcd", folder / "s1.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "sub/s2.safetensors"}})
    )
    ck = open_checkpoint(folder)
    assert torch.equal(ck.get("a"), torch.ones(2)) and torch.equal(ck.get("b"), torch.full((2,), 3.0))


def test_folder_with_model_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.randn(3)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    ck = open_checkpoint(folder)
    assert isinstance(ck, SafetensorsFile) and ck.path == folder / "model.safetensors"
    assert ck.folder == folder and ck.architecture() == "bert"


def test_diffusers_component_folder(tmp_path: Path) -> None:
    folder = tmp_path / "unet"
    folder.mkdir()
    w = torch.randn(4, 3, 3, 3).half()
    save_file({"conv_in.weight": w}, str(folder / "diffusion_pytorch_model.safetensors"))
    save_file({"conv_in.weight": w.float()}, str(folder / "diffusion_pytorch_model.fp32.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    ck = open_checkpoint(folder)
    assert isinstance(ck, SafetensorsFile)
    assert ck.path.name == "diffusion_pytorch_model.safetensors"  # the canonical file, not the variant
    assert ck.folder == folder and ck.architecture() == "UNet2DConditionModel"
    assert torch.equal(ck.get("conv_in.weight"), w)


def test_folder_with_one_oddly_named_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "lora-free"
    folder.mkdir()
    save_file({"w": torch.ones(1)}, str(folder / "my_finetune_v2.safetensors"))
    assert open_checkpoint(folder).path.name == "my_finetune_v2.safetensors"


def test_trainer_output_folder_prefers_the_weights(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    torch.save({"lr": torch.tensor(0.1)}, folder / "optimizer.pt")
    torch.save({"x": torch.tensor(1)}, folder / "training_args.bin")
    ck = open_checkpoint(folder)
    assert isinstance(ck, TorchPickleFile) and ck.path.name == "pytorch_model.bin" and ck.folder == folder


def test_diffusers_pipeline_root_points_to_components(tmp_path: Path) -> None:
    root = tmp_path / "pipe"
    for part in ("unet", "vae", "text_encoder"):
        (root / part).mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="diffusers pipeline") as info:
        open_checkpoint(root)
    assert "unet" in str(info.value) and info.value.path == root


@pytest.mark.parametrize("torch_format", [False, True], ids=["safetensors", "torch"])
def test_read_into_fills_buffers_of_any_dtype_and_layout(tmp_path: Path, torch_format: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = corpus.roundtrip_tensors()
    ck = open_checkpoint(write_sharded(tmp_path / "model", tensors, torch_format=torch_format))
    if not torch_format:  # stored dtype into a contiguous buffer: the bytes go straight in, no get()
        monkeypatch.setattr(SafetensorsFile, "_load", lambda self, name: pytest.fail(f"read {name} through get"))
    for name, want in tensors.items():
        same = torch.full_like(want, 7) if want.numel() else torch.empty_like(want)
        ck.read_into(name, same)
        assert torch.equal(same, want), name
    monkeypatch.undo()
    for name, want in tensors.items():
        if not want.is_floating_point():
            continue
        upcast = torch.zeros(want.shape, dtype=torch.float64)
        ck.read_into(name, upcast)
        assert torch.equal(upcast, want.double()), name
        if want.dim() == 2:  # a strided view, e.g. one row of a stacked buffer transposed
            wide = torch.zeros(want.shape[1], want.shape[0], dtype=want.dtype).t()
            ck.read_into(name, wide)
            assert torch.equal(wide, want), name
    name = next(n for n, t in tensors.items() if t.dim() >= 1 and t.numel() > 1)
    with pytest.raises(CheckpointError, match="buffer of shape") as info:
        ck.read_into(name, torch.empty(tensors[name].numel() + 1))
    assert info.value.tensor == name
    ck.close()


def test_read_into_a_shard_truncated_after_opening_is_an_error(tmp_path: Path) -> None:
    tensors = {f"w{i}": torch.randn(32, 32) for i in range(4)}
    folder = write_sharded(tmp_path / "m", tensors, n=2)
    ck = open_checkpoint(folder)
    shard = ck.shard_of("w3")
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="changed on disk") as info:
        ck.read_into("w3", torch.empty(32, 32))
    assert info.value.tensor == "w3" and info.value.path == shard
    ck.close()
