"""Streaming writer of (sharded) safetensors, one tensor at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once;
a 5 GB shard would defeat streaming. Here the shapes and dtypes of all output
tensors are known before the merge starts, so each shard's header (with its
offsets) is written first and tensor bytes are appended as they are produced.
The files are byte-compatible with the safetensors format (header padded with
spaces to a multiple of 8, offsets relative to the data area).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

from ..checkpoint import TensorInfo
from .st_dtypes import TORCH_TO_SAFETENSORS

DEFAULT_SHARD_BYTES = 5 * 1000**3  # transformers' default max_shard_size "5GB"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# What the writer needs to know of a tensor before its data exists: the same
# facts a reader's header gives.
PlannedTensor = TensorInfo


def plan_shards(tensors: Iterable[PlannedTensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[list[PlannedTensor]]:
    """Fill shards in order; a tensor bigger than the limit gets a shard of its own."""
    if max_shard_bytes <= 0:
        raise ValueError("shard size must be positive")
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without an extra copy when contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class SafetensorsFileWriter:
    """One safetensors file whose tensors are announced up front and written in that order."""

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._planned = list(tensors)
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise ValueError("safetensors metadata must map strings to strings")
            header["__metadata__"] = dict(metadata)
        offset = 0
        for t in self._planned:
            if t.dtype not in TORCH_TO_SAFETENSORS:
                raise ValueError(f"tensor '{t.name}': dtype {t.dtype} cannot be stored in safetensors")
            header[t.name] = {"dtype": TORCH_TO_SAFETENSORS[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._file: BinaryIO = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self.data_bytes = offset

    @property
    def complete(self) -> bool:
        return self._next == len(self._planned)

    def expects(self, name: str) -> bool:
        return self._next < len(self._planned) and self._planned[self._next].name == name

    def write(self, name: str, tensor: torch.Tensor) -> int:
        if self._next >= len(self._planned):
            raise ValueError(f"{self.path}: no more tensors expected, got '{name}'")
        planned = self._planned[self._next]
        if planned.name != name:
            raise ValueError(f"{self.path}: expected tensor '{planned.name}' next, got '{name}'")
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise ValueError(
                f"{self.path}: tensor '{name}' is {tuple(tensor.shape)} {tensor.dtype}, planned {planned.shape} {planned.dtype}"
            )
        data = tensor_bytes(tensor)
        self._file.write(data)
        self._next += 1
        return len(data)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()
        if not self.complete:
            missing = self._planned[self._next].name
            raise ValueError(f"{self.path}: closed before tensor '{missing}' was written")

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


class ShardedSafetensorsWriter:
    """Writes `model.safetensors`, or shards plus `model.safetensors.index.json`, into a folder."""

    def __init__(
        self,
        folder: Path,
        tensors: list[PlannedTensor],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self._shard_of = {t.name: i for i, shard in enumerate(self.shards) for t in shard}
        self._current: SafetensorsFileWriter | None = None
        self._current_index = -1
        self.total_size = sum(t.nbytes for shard in self.shards for t in shard)

    def write(self, name: str, tensor: torch.Tensor) -> int:
        index = self._shard_of.get(name)
        if index is None:
            raise ValueError(f"tensor '{name}' was not planned for this output")
        if index != self._current_index:
            if index < self._current_index:
                raise ValueError(f"tensor '{name}' arrived after its shard was finished")
            self._finish_current()
            self._current_index = index
            self._current = SafetensorsFileWriter(self.folder / self.file_names[index], self.shards[index], self.metadata)
        assert self._current is not None
        return self._current.write(name, tensor)

    def _finish_current(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def close(self) -> list[Path]:
        """Finish the last shard, write the index when sharded; returns the files written."""
        self._finish_current()
        while self._current_index < len(self.shards) - 1:  # shards never started (an empty model)
            self._current_index += 1
            i = self._current_index
            SafetensorsFileWriter(self.folder / self.file_names[i], self.shards[i], self.metadata).close()
        files = [self.folder / n for n in self.file_names]
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {t.name: self.file_names[i] for i, shard in enumerate(self.shards) for t in shard},
            }
            path = self.folder / INDEX_FILE
            path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            files.append(path)
        return files

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None
