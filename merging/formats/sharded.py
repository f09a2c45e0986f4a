"""Hugging Face sharded folders: an index json naming, for each tensor, the shard that holds it.

`model.safetensors.index.json` / `pytorch_model.bin.index.json` (diffusers uses
`diffusion_pytorch_model.*.index.json`) = `{"metadata": {...}, "weight_map":
{tensor: shard file}}`. The index is validated before any shard is touched: a
shard it names must be a plain file name inside the folder (no `..`, no
absolute path). Opening reads each shard's header (safetensors) or pickled
structure (torch, memory-mapped); tensor data is read per `get`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import CheckpointError
from .safetensors_file import DuplicateKeyError, SafetensorsFile, loads_strict_json
from .torch_pickle import TorchPickleFile

log = logging.getLogger(__name__)


def _is_unsafe_relative(name: str) -> bool:
    """True for names that could leave the folder: absolute, drive-qualified, or with a `..` part."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return any(part == ".." for part in re.split(r"[\\/]", name))


def read_index(index_path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """(weight_map, metadata) of an index file, validated."""
    try:
        text = index_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(index_path, f"cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CheckpointError(index_path, "index is not UTF-8 text") from None
    try:
        data = loads_strict_json(text)
    except DuplicateKeyError as dup:
        raise CheckpointError(index_path, f"index names '{dup.key}' twice", tensor=dup.key) from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(index_path, f"index is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise CheckpointError(index_path, "index has no 'weight_map' object")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(index_path, "index 'metadata' is not an object")
    weight_map: dict[str, str] = {}
    for name, shard in data["weight_map"].items():
        if not isinstance(shard, str) or not shard.strip():
            raise CheckpointError(index_path, f"index maps the tensor to {shard!r}, not a file name", tensor=name)
        if _is_unsafe_relative(shard):
            raise CheckpointError(
                index_path, f"index maps the tensor to '{shard}', a path outside the model folder; refused", tensor=name
            )
        weight_map[name] = shard
    if not weight_map:
        raise CheckpointError(index_path, "index 'weight_map' is empty")
    return weight_map, metadata


class ShardedCheckpoint(Checkpoint):
    """Tensors spread over shard files listed by an index; subclasses choose the shard reader."""

    _open_shard: Callable[..., Checkpoint]

    def __init__(self, folder: str | Path, index_file: str | Path | None = None):
        super().__init__(folder)
        self.index_path = self.path / index_file if index_file is not None else self._default_index()
        self._weight_map, self._index_metadata = read_index(self.index_path)
        shard_names = sorted(set(self._weight_map.values()))
        missing = [s for s in shard_names if not (self.path / s).is_file()]
        if missing:
            listed = ", ".join(missing)
            raise CheckpointError(self.index_path, f"index names shard file(s) missing from {self.path}: {listed}")
        self._shards: dict[str, Checkpoint] = {}
        infos: dict[str, TensorInfo] = {}
        listed_in: dict[str, list[str]] = {s: [] for s in shard_names}
        for name, shard in self._weight_map.items():
            listed_in[shard].append(name)
        try:
            for shard in shard_names:
                reader = type(self)._open_shard(self.path / shard, folder=self.path)
                self._shards[shard] = reader
                wanted = set(listed_in[shard])
                absent = [n for n in listed_in[shard] if n not in reader]
                if absent:
                    raise CheckpointError(
                        self.index_path, f"index places the tensor in '{shard}' but that shard does not hold it", tensor=absent[0]
                    )
                extras = [n for n in reader.names() if n not in wanted]
                if extras:
                    log.warning("%s: %d tensor(s) not listed in %s are ignored (e.g. '%s')", reader.path, len(extras), self.index_path.name, extras[0])
                for name in reader.names():  # shard order, so a merge reads each shard front to back
                    if name in wanted:
                        infos[name] = reader.info(name)
        except BaseException:
            self.close()
            raise
        self._infos = infos

    def _default_index(self) -> Path:  # pragma: no cover - subclasses define it
        raise NotImplementedError

    def index_metadata(self) -> dict[str, Any]:
        """The index's `metadata` block (e.g. `total_size`)."""
        return dict(self._index_metadata)

    def shard_of(self, name: str) -> Path:
        self.info(name)
        return self.path / self._weight_map[name]

    def _load(self, name: str) -> torch.Tensor:
        return self._shards[self._weight_map[name]].get(name)

    def _read_bytes_into(self, name: str, out: torch.Tensor) -> bool:
        return self._shards[self._weight_map[name]]._read_bytes_into(name, out)

    def files(self) -> list[Path]:
        return [self.index_path] + [self.path / s for s in sorted(self._shards)]

    @property
    def folder(self) -> Path:
        return self.path

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


class ShardedSafetensors(ShardedCheckpoint):
    """`*.safetensors` shards + `model.safetensors.index.json` (or diffusers' equivalent)."""

    format = "safetensors-sharded"
    _open_shard = SafetensorsFile

    def _default_index(self) -> Path:
        return self.path / "model.safetensors.index.json"

    def metadata(self) -> dict[str, str]:
        """`__metadata__` of the first shard (writers repeat it in every shard)."""
        first = next(iter(sorted(self._shards)))
        return self._shards[first].metadata()  # type: ignore[attr-defined]


class ShardedTorchPickle(ShardedCheckpoint):
    """`pytorch_model-*.bin` shards + `pytorch_model.bin.index.json`."""

    format = "torch-sharded"
    _open_shard = TorchPickleFile

    def _default_index(self) -> Path:
        return self.path / "pytorch_model.bin.index.json"
