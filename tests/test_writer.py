"""The streaming safetensors writer produces files every safetensors reader accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merging.formats.safetensors_writer import PlannedTensor, ShardedSafetensorsWriter, plan_shards


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(5, 3, generator=g),
        "b.half": torch.randn(7, generator=g).half(),
        "c.bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "d.count": torch.tensor(3, dtype=torch.int64),
        "e.empty": torch.zeros(0, 4),
        "f.mask": torch.tensor([True, False, True]),
    }


def _write(folder: Path, tensors: dict[str, torch.Tensor], shard: int) -> list[Path]:
    planned = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    w = ShardedSafetensorsWriter(folder, planned, max_shard_bytes=shard, metadata={"note": "x"})
    for k, v in tensors.items():
        w.write(k, v)
    return w.close()


def test_single_file_round_trip(tmp_path: Path) -> None:
    tensors = _tensors()
    files = _write(tmp_path, tensors, 10**9)
    assert [f.name for f in files] == ["model.safetensors"]
    loaded = load_file(str(files[0]))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    header_len = int.from_bytes(files[0].read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_sharded_output_has_a_consistent_index(tmp_path: Path) -> None:
    tensors = _tensors()
    files = _write(tmp_path, tensors, 40)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted({f.name for f in files if f.suffix == ".safetensors"})
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / shard))[name], tensors[name])


def test_plan_keeps_order_and_isolates_big_tensors() -> None:
    p = [PlannedTensor(str(i), (n,), torch.float32) for i, n in enumerate([10, 10, 100, 10])]
    shards = plan_shards(p, 80)
    assert [[t.name for t in s] for s in shards] == [["0", "1"], ["2"], ["3"]]


def test_writer_refuses_out_of_plan_tensors(tmp_path: Path) -> None:
    planned = [PlannedTensor("a", (2,), torch.float32), PlannedTensor("b", (2,), torch.float32)]
    w = ShardedSafetensorsWriter(tmp_path, planned)
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        w.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="closed before tensor 'b'"):
        w.close()


def test_empty_model_writes_a_valid_file(tmp_path: Path) -> None:
    files = ShardedSafetensorsWriter(tmp_path, []).close()
    assert load_file(str(files[0])) == {}
