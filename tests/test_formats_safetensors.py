"""SafetensorsFile: round trips of every dtype family, lazy opening, owned tensors."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merging.checkpoint import open_checkpoint
from merging.errors import CheckpointError
from merging.formats import safetensors_file
from merging.formats.safetensors_file import SafetensorsFile, read_header

try:
    from . import formats_corpus as corpus
except ImportError:
    import formats_corpus as corpus


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    assert torch.equal(got, want)


def test_round_trip_every_dtype_scalar_and_empty(tmp_path: Path) -> None:
    tensors = corpus.roundtrip_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "recipe": '{"method": "ties"}'})
    ck = open_checkpoint(path)
    assert isinstance(ck, SafetensorsFile) and ck.format == "safetensors"
    assert sorted(ck.names()) == sorted(tensors)
    for name, want in tensors.items():
        assert ck.info(name).shape == tuple(want.shape)
        assert ck.info(name).dtype == want.dtype
        assert_same(ck.get(name), want)
    assert ck.metadata() == {"format": "pt", "recipe": '{"method": "ties"}'}
    assert ck.num_params == sum(t.numel() for t in tensors.values())
    assert ck.files() == [path]
    assert ck.folder == tmp_path


def test_float8_round_trip(tmp_path: Path) -> None:
    want = torch.tensor([0.5, -2.0, 8.0]).to(torch.float8_e4m3fn)
    save_file({"q": want}, str(tmp_path / "q.safetensors"))
    got = open_checkpoint(tmp_path / "q.safetensors").get("q")
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.float(), want.float())


def test_names_follow_the_data_order(tmp_path: Path) -> None:
    """Reading in `names()` order walks each file front to back."""
    path = tmp_path / "m.safetensors"
    save_file({"z": torch.ones(100), "a": torch.ones(3, dtype=torch.int8), "m": torch.ones(10, dtype=torch.float16)}, str(path))
    header = read_header(path)
    begins = [header.entries[n].begin for n in open_checkpoint(path).names()]
    assert begins == sorted(begins)


def test_opening_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening reads exactly 8 + header bytes; `get` then reads exactly that tensor's bytes."""
    path = tmp_path / "m.safetensors"
    save_file({"big": torch.randn(256, 256), "small": torch.ones(3)}, str(path))
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    bytes_read = []
    mapped = []

    class CountingFile(io.FileIO):
        def read(self, size: int = -1) -> bytes:
            data = super().read(size)
            bytes_read.append(len(data))
            return data

        def readinto(self, buffer) -> int:
            n = super().readinto(buffer)
            bytes_read.append(n)
            return n

    def counting_open(file, mode="r", *args, **kwargs):
        assert mode == "rb"
        return CountingFile(file, "r")  # unbuffered: every byte read is counted

    real_from_file = torch.UntypedStorage.from_file
    monkeypatch.setattr(safetensors_file, "open", counting_open, raising=False)
    monkeypatch.setattr(torch.UntypedStorage, "from_file", lambda *a, **k: mapped.append(a) or real_from_file(*a, **k))
    ck = SafetensorsFile(path)
    assert sum(bytes_read) == 8 + header_len
    assert mapped == []
    assert ck.info("big").nbytes == 256 * 256 * 4
    ck.get("small")
    assert mapped == []  # read, never mapped: a truncated file must not SIGBUS
    assert sum(bytes_read) == 8 + header_len + 3 * 4  # exactly the tensor asked for


def test_get_returns_a_tensor_the_caller_owns(tmp_path: Path) -> None:
    """In-place changes to a returned tensor touch neither the file nor later reads."""
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path))
    before = path.read_bytes()
    ck = open_checkpoint(path)
    first = ck.get("w")
    first.add_(100)
    assert torch.equal(ck.get("w"), torch.arange(6.0).reshape(2, 3))
    del first
    assert path.read_bytes() == before


def test_unaligned_data_is_read_correctly(tmp_path: Path) -> None:
    """Other writers may not align tensors; an odd offset still reads the right values."""
    values = torch.tensor([1.5, -2.25, 3.0])
    header = {"flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "w": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)  # data area 8-aligned, so 'w' sits at an odd address
    data = bytes([7]) + values.numpy().tobytes()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    ck = open_checkpoint(path)
    assert torch.equal(ck.get("w"), values)
    assert ck.get("flag").tolist() == [7]


def test_zero_tensors_and_empty_metadata(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(struct.pack("<Q", 2) + b"{}")
    ck = open_checkpoint(path)
    assert len(ck) == 0 and ck.metadata() == {}


def test_a_file_changed_after_opening_is_refused_not_crashed(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(1000), "b": torch.ones(1000)}, str(path))
    ck = open_checkpoint(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="changed on disk") as info:
        ck.get("b")
    assert info.value.path == path and info.value.tensor == "b"


def test_unknown_tensor_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(1)}, str(path))
    with pytest.raises(CheckpointError, match="no such tensor") as info:
        open_checkpoint(path).get("nope")
    assert info.value.path == path and info.value.tensor == "nope"


def test_unreadable_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    folder = tmp_path / "looks-like-a-file.safetensors"
    folder.mkdir()
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(folder)
    assert info.value.path == folder



def test_reads_without_memory_mapping_when_mapping_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = corpus.roundtrip_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))

    def no_mapping(*args, **kwargs):
        raise RuntimeError("mapping not supported here")

    monkeypatch.setattr(torch.UntypedStorage, "from_file", no_mapping)
    ck = open_checkpoint(path)
    for name, want in tensors.items():
        assert_same(ck.get(name), want)
