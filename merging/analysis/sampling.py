"""Which parameters of a tensor the analysis reads, and reading just those.

Big models are analysed on a seeded uniform sample: each tensor larger than the
sample size is cut into blocks of `block` consecutive elements and
`ceil(sample_size / block)` blocks are drawn without replacement. Every element
then has the same inclusion probability, so a sum over the sample times
`weight` (blocks in the tensor / blocks drawn) estimates the sum over the
tensor without bias; blocks keep the reads to a few pages per tensor instead of
one page per element. The draw depends only on (seed, tensor name, size), so
every model is read at the same positions and a second pass sees the same
sample. A block is at most 1/16 of a row (16 to 256 elements, `block_for`):
neighbouring weights of one row share its scale, so a block that spans much
of a row makes the estimates noisier than independent elements would, while
every block costs one page read (4 KB) when the file is not in the page cache.
At 256 elements a 7B-class trio reads ~13 times fewer pages than at 16.

Safetensors files (single or sharded) are read at the sampled positions
through a read-only memory map, so a 7B-class checkpoint costs a few megabytes
of reads; a LoRA adapter reads its base the same way and adds the low-rank
delta at those positions. Other formats fall back to reading the whole tensor.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint

DEFAULT_SAMPLE_SIZE = 32_768
MIN_BLOCK = 16
MAX_BLOCK = 256
#: Models with at most this many floating-point parameters are analysed exactly by default.
AUTO_EXACT_MAX_PARAMS = 32_000_000


@dataclass(frozen=True)
class TensorSample:
    """The analysed positions of one tensor (row-major flat indices into the base's shape)."""

    name: str
    numel: int
    index: np.ndarray | None  # sorted int64 positions; None: every element
    weight: float  # elements of the tensor per analysed element (1 / inclusion probability)

    @property
    def size(self) -> int:
        return self.numel if self.index is None else int(self.index.size)

    @property
    def exact(self) -> bool:
        return self.index is None


def _tensor_seed(seed: int, name: str, numel: int) -> int:
    text = f"alloy-analysis|{int(seed)}|{name}|{int(numel)}".encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def block_for(shape: tuple[int, ...] | list[int], block: int | None = None) -> int:
    """Run length for a tensor: `block` if given, else 1/16 of a row (the last axis), within [16, 256]."""
    if block is not None:
        return max(1, int(block))
    row = int(shape[-1]) if len(shape) else 1
    return int(min(MAX_BLOCK, max(MIN_BLOCK, row // 16)))


def plan_sample(name: str, numel: int, sample_size: int | None, *, block: int = MIN_BLOCK, seed: int = 0) -> TensorSample:
    """All of a tensor (sample_size None, or the tensor is small) or a seeded block sample of it."""
    if sample_size is None or numel <= sample_size:
        return TensorSample(name, numel, None, 1.0)
    block = max(1, min(int(block), int(sample_size)))
    n_blocks = math.ceil(numel / block)
    wanted = min(n_blocks, math.ceil(sample_size / block))
    rng = np.random.default_rng(_tensor_seed(seed, name, numel))
    starts = np.sort(rng.choice(n_blocks, size=wanted, replace=False)).astype(np.int64) * block
    index = (starts[:, None] + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)
    index = index[index < numel]
    return TensorSample(name, numel, index, n_blocks / wanted)


# -- reading ---------------------------------------------------------------------------

_NP_DTYPES = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.bfloat16: np.uint16,  # upper half of a float32
}
_maps: dict[tuple[str, int, int], np.memmap] = {}
_maps_lock = threading.Lock()
_MAX_MAPS = 64


def _file_map(path: Path) -> np.memmap | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _maps_lock:
        mm = _maps.get(key)
        if mm is None:
            for old in [k for k in _maps if k[0] == key[0]] + list(_maps)[: max(0, len(_maps) - _MAX_MAPS)]:
                _maps.pop(old, None)
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            try:  # sampled reads are scattered: no read-ahead around each one
                mm._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
            except (AttributeError, OSError, ValueError):
                pass
            _maps[key] = mm
        return mm


def release_maps() -> None:
    """Forget the memory maps of files read so far (an analysis calls this when it ends).

    A map keeps its file open (on Windows it cannot be replaced or deleted
    meanwhile) and keeps its pages from being dropped from the page cache.
    Readers still holding a map keep theirs until they finish.
    """
    with _maps_lock:
        _maps.clear()


def _safetensors_location(ckpt: Checkpoint, name: str) -> tuple[Path, int, int] | None:
    """(file, first byte, byte count) of a tensor stored as-is in a safetensors file, else None."""
    from ..formats.safetensors_file import SafetensorsFile, read_header
    from ..formats.sharded import ShardedSafetensors

    if isinstance(ckpt, SafetensorsFile):
        header, path = ckpt.header, ckpt.path
    elif isinstance(ckpt, ShardedSafetensors):
        path = ckpt.shard_of(name)
        header = _cached_header(path, read_header)
    else:
        return None
    entry = header.entries.get(name)
    info = ckpt.info(name)
    if entry is None or entry.shape != info.shape or entry.dtype != info.dtype:
        return None
    try:
        if os.stat(path).st_size != header.file_size:
            return None  # changed since opened: let `get` report it
    except OSError:
        return None
    return path, header.data_start + entry.begin, entry.nbytes


_headers: dict[tuple[str, int, int], object] = {}


def _cached_header(path: Path, read_header):  # type: ignore[no-untyped-def]
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    header = _headers.get(key)
    if header is None:
        header = read_header(path)
        if len(_headers) >= _MAX_MAPS:
            _headers.clear()
        _headers[key] = header
    return header


def _read_mapped(ckpt: Checkpoint, name: str, index: np.ndarray) -> torch.Tensor | None:
    info = ckpt.info(name)
    np_dtype = _NP_DTYPES.get(info.dtype)
    if np_dtype is None:
        return None
    where = _safetensors_location(ckpt, name)
    if where is None:
        return None
    path, start, nbytes = where
    mm = _file_map(path)
    if mm is None:
        return None
    raw = mm[start : start + nbytes].view(np_dtype)
    values = np.asarray(raw[index])
    if info.dtype == torch.bfloat16:
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return torch.from_numpy(values.astype(np.float32, copy=False))


def _read_lora(ckpt: Checkpoint, name: str, index: np.ndarray) -> torch.Tensor | None:
    """base + ΔW at the sampled positions, rounded to the stored dtype as the adapter's `get` does."""
    from ..formats.lora import LoraAdapter

    if not isinstance(ckpt, LoraAdapter) or name in ckpt.replaced_names():
        return None
    info = ckpt.info(name)
    base_values = read_values(ckpt.base, name, TensorSample(name, info.numel, index, 1.0))
    compute = torch.float64 if info.dtype == torch.float64 else torch.float32
    delta = ckpt.delta(name, compute)
    if delta is None:
        return base_values
    idx = torch.from_numpy(index)
    return (base_values.to(compute) + delta.reshape(-1)[idx]).to(info.dtype).to(torch.float32)


def read_values(ckpt: Checkpoint, name: str, sample: TensorSample) -> torch.Tensor:
    """float32 values of `name` at the sample's positions (1-D, length `sample.size`).

    A tensor with more rows than the base (a grown vocabulary) is read on the
    base's rows only: positions index the base's row-major layout.
    """
    if sample.index is not None:
        for reader in (_read_mapped, _read_lora):
            values = reader(ckpt, name, sample.index)
            if values is not None:
                return values
    tensor = ckpt.get(name)
    flat = tensor.reshape(-1)[: sample.numel]
    if sample.index is not None:
        flat = flat[torch.from_numpy(sample.index)]
    return flat.to(torch.float32)
