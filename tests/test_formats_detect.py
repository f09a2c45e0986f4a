"""open_detected: which reader a dropped file or folder gets."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merging.checkpoint import open_checkpoint
from merging.errors import CheckpointError
from merging.formats.detect import NOT_A_CHECKPOINT, open_detected, sniff
from merging.formats.lora import LoraAdapter
from merging.formats.safetensors_file import SafetensorsFile
from merging.formats.sharded import ShardedSafetensors, ShardedTorchPickle
from merging.formats.torch_pickle import TorchPickleFile


def test_unknown_file_type_message(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\x08\x07\x12\x04onnx" + bytes(64))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert str(info.value) == f"{path}: {NOT_A_CHECKPOINT}"
    assert NOT_A_CHECKPOINT == "not a checkpoint (expected .safetensors, .bin/.pt, a Hugging Face folder or a PEFT adapter folder)"


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "gone.safetensors")


def test_content_decides_when_the_name_does_not(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.sft"))
    torch.save({"w": torch.ones(2)}, tmp_path / "model.weights")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    (tmp_path / "model.legacy").write_bytes(buf.getvalue())
    zip_not_torch = tmp_path / "archive.data"
    shutil.make_archive(str(tmp_path / "archive"), "zip", root_dir=tmp_path, base_dir="model.sft")
    (tmp_path / "archive.zip").rename(zip_not_torch)
    assert sniff(tmp_path / "model.sft") == "safetensors"
    assert sniff(tmp_path / "model.weights") == "torch"
    assert sniff(tmp_path / "model.legacy") == "torch"
    assert sniff(zip_not_torch) is None
    assert isinstance(open_checkpoint(tmp_path / "model.sft"), SafetensorsFile)
    assert isinstance(open_checkpoint(tmp_path / "model.weights"), TorchPickleFile)
    assert isinstance(open_checkpoint(tmp_path / "model.legacy"), TorchPickleFile)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        open_checkpoint(zip_not_torch)


def test_safetensors_preferred_over_pickles_in_one_folder(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert isinstance(open_detected(tmp_path), SafetensorsFile)


def test_sharded_safetensors_preferred_over_sharded_pickles(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00001.bin")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}))
    assert isinstance(open_detected(tmp_path), ShardedSafetensors)
    assert isinstance(open_detected(tmp_path / "pytorch_model.bin.index.json"), ShardedTorchPickle)


def test_diffusers_sharded_index(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "diffusion_pytorch_model-00001-of-00002.safetensors", "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    ck = open_detected(tmp_path)
    assert isinstance(ck, ShardedSafetensors) and sorted(ck.names()) == ["a", "b"]


def test_adapter_found_from_folder_config_or_weights_file(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    save_file({"lin.weight": torch.zeros(3, 2)}, str(base / "model.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 1, "peft_type": "LORA"}))
    save_file({"base_model.model.lin.lora_A.weight": torch.ones(1, 2), "base_model.model.lin.lora_B.weight": torch.ones(3, 1)},
              str(adapter / "adapter_model.safetensors"))
    for path in (adapter, adapter / "adapter_config.json", adapter / "adapter_model.safetensors"):
        ck = open_detected(path, base=base)
        assert isinstance(ck, LoraAdapter) and ck.path == adapter
        assert torch.equal(ck.get("lin.weight"), torch.ones(3, 2))


def test_base_argument_is_ignored_for_full_models(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    ck = open_checkpoint(tmp_path / "m.safetensors", base=tmp_path / "does-not-matter")
    assert ck.names() == ["w"]
