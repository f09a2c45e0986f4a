"""TorchPickleFile: weights_only loading, nested state dicts, tied weights, refusal of code."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from merging.checkpoint import open_checkpoint
from merging.errors import CheckpointError
from merging.formats import torch_pickle
from merging.formats.torch_pickle import TorchPickleFile

try:
    from . import formats_corpus as corpus
except ImportError:
    import formats_corpus as corpus


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    assert torch.equal(got, want)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_round_trip_every_dtype_scalar_and_empty(tmp_path: Path, suffix: str) -> None:
    tensors = corpus.roundtrip_tensors()
    path = tmp_path / f"model{suffix}"
    torch.save(tensors, path)
    ck = open_checkpoint(path)
    assert isinstance(ck, TorchPickleFile) and ck.format == "torch"
    assert ck.names() == list(tensors)
    for name, want in tensors.items():
        assert ck.info(name).shape == tuple(want.shape) and ck.info(name).dtype == want.dtype
        assert_same(ck.get(name), want)


def test_legacy_non_zip_format_round_trip(tmp_path: Path) -> None:
    tensors = corpus.roundtrip_tensors()
    buf = io.BytesIO()
    torch.save(tensors, buf, _use_new_zipfile_serialization=False)
    path = tmp_path / "old.pt"
    path.write_bytes(buf.getvalue())
    ck = open_checkpoint(path)
    for name, want in tensors.items():
        assert_same(ck.get(name), want)


def test_loads_only_with_weights_only_and_mmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch_pickle.torch, "load", spy)
    torch.save({"w": torch.ones(3)}, tmp_path / "new.pt")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf, _use_new_zipfile_serialization=False)
    (tmp_path / "old.pt").write_bytes(buf.getvalue())
    TorchPickleFile(tmp_path / "new.pt")
    TorchPickleFile(tmp_path / "old.pt")
    assert calls == [
        {"map_location": "cpu", "weights_only": True, "mmap": True},
        {"map_location": "cpu", "weights_only": True, "mmap": False},
    ]


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_nested_state_dict_is_unwrapped_and_other_entries_ignored(tmp_path: Path, key: str) -> None:
    inner = {"encoder.weight": torch.randn(3, 2), "encoder.bias": torch.randn(3), "step": 12}
    torch.save({key: inner, "epoch": 4, "optimizer": {"lr": 0.1}, "hparams": {"depth": 2}}, tmp_path / "c.ckpt")
    ck = open_checkpoint(tmp_path / "c.ckpt")
    assert ck.names() == ["encoder.weight", "encoder.bias"]
    assert_same(ck.get("encoder.bias"), inner["encoder.bias"])


def test_doubly_nested_and_lightning_style(tmp_path: Path) -> None:
    w = torch.randn(2, 2)
    torch.save({"global_step": 10, "model": {"state_dict": OrderedDict(w=w)}}, tmp_path / "c.pt")
    assert_same(open_checkpoint(tmp_path / "c.pt").get("w"), w)


def test_module_prefixes_are_kept(tmp_path: Path) -> None:
    """DataParallel's `module.` prefix is data, not noise: renaming silently would hide mismatches."""
    sd = {"module.fc.weight": torch.ones(2, 2), "module.fc.bias": torch.zeros(2)}
    torch.save(sd, tmp_path / "dp.pt")
    assert open_checkpoint(tmp_path / "dp.pt").names() == ["module.fc.weight", "module.fc.bias"]


def test_tied_weights_share_storage_in_the_file_and_read_back(tmp_path: Path) -> None:
    emb = torch.randn(5, 3)
    sd = {"wte.weight": emb, "lm_head.weight": emb, "first_row": emb[0]}
    torch.save(sd, tmp_path / "tied.bin")
    ck = open_checkpoint(tmp_path / "tied.bin")
    assert_same(ck.get("wte.weight"), emb)
    assert_same(ck.get("lm_head.weight"), emb)
    assert_same(ck.get("first_row"), emb[0])
    got = ck.get("wte.weight")
    got.zero_()  # the caller owns what it gets; the alias must not change
    assert_same(ck.get("lm_head.weight"), emb)


def test_parameters_come_back_as_plain_tensors(tmp_path: Path) -> None:
    layer = torch.nn.Linear(3, 2)
    torch.save(layer.state_dict(keep_vars=True), tmp_path / "p.pt")
    got = open_checkpoint(tmp_path / "p.pt").get("weight")
    assert type(got) is torch.Tensor and not got.requires_grad
    assert torch.equal(got, layer.weight.detach())


def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "payload": corpus.WritesMarker(marker)}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path / "evil.bin")
    assert "refused: the pickle wants to run code / load non-tensor objects; weights_only=True" in str(info.value)
    assert info.value.path == tmp_path / "evil.bin"
    assert not marker.exists()
    # the same file loaded without the guard does run the payload: the test above is not vacuous
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.exists()


def test_close_then_read_again(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(4.0)}, tmp_path / "m.pt")
    ck = open_checkpoint(tmp_path / "m.pt")
    ck.close()
    assert_same(ck.get("w"), torch.arange(4.0))
