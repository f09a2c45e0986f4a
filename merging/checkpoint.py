"""Checkpoint: a lazy, format-neutral map from tensor name to tensor.

Opening a checkpoint reads headers only; `get` reads one tensor's data when the
executor asks for it. Every format in `merging.formats` returns a subclass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import CheckpointError


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor, before its data is read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class Checkpoint:
    """Base class: subclasses fill `_infos` at open time and implement `_load`."""

    format: str = "unknown"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._infos: dict[str, TensorInfo] = {}

    # -- the mapping --------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(self.path, "no such tensor in this checkpoint", tensor=name) from None

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a CPU tensor of the stored dtype and shape)."""
        info = self.info(name)
        tensor = self._load(name)
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise CheckpointError(
                self.path,
                f"data is {tuple(tensor.shape)} {tensor.dtype} but the header says {info.shape} {info.dtype}",
                tensor=name,
            )
        return tensor

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` (the tensor's shape, any dtype) with one tensor's values.

        The executor reads straight into its stacked compute buffer this way;
        formats that can read the bytes in place skip the intermediate copy.
        """
        info = self.info(name)
        if tuple(out.shape) != info.shape:
            raise CheckpointError(self.path, f"cannot read {info.shape} into a buffer of shape {tuple(out.shape)}", tensor=name)
        if out.dtype == info.dtype and out.device.type == "cpu" and out.is_contiguous() and self._read_bytes_into(name, out):
            return
        out.copy_(self.get(name))

    def _read_bytes_into(self, name: str, out: torch.Tensor) -> bool:
        """Read the stored bytes straight into `out` if this format can; False to fall back to `get`."""
        return False

    def _load(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- summaries ------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return sum(i.numel for i in self._infos.values())

    @property
    def data_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def dtypes(self) -> dict[str, int]:
        """dtype name -> number of tensors, for summaries."""
        counts: dict[str, int] = {}
        for i in self._infos.values():
            key = dtype_name(i.dtype)
            counts[key] = counts.get(key, 0) + 1
        return counts

    @property
    def folder(self) -> Path:
        """The folder holding config/tokenizer files for this checkpoint."""
        return self.path if self.path.is_dir() else self.path.parent

    def config(self) -> dict | None:
        """config.json beside the weights, if there is one and it parses."""
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            return None
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(cfg, f"config.json does not parse: {exc}") from None
        return data if isinstance(data, dict) else None

    def architecture(self) -> str | None:
        cfg = self.config()
        if not cfg:
            return None
        archs = cfg.get("architectures")
        if isinstance(archs, list) and archs:
            return str(archs[0])
        for key in ("model_type", "_class_name"):
            if key in cfg:
                return str(cfg[key])
        return None

    def files(self) -> list[Path]:
        """The files whose bytes make up this checkpoint (for identity and change detection)."""
        return [self.path] if self.path.is_file() else []

    def close(self) -> None:
        """Release file handles; the checkpoint may be reopened by reading again."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.path} tensors={len(self)}>"


_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}
_DTYPES_BY_NAME.update({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16, "float": torch.float32})
if hasattr(torch, "float8_e4m3fn"):
    _DTYPE_NAMES[torch.float8_e4m3fn] = "float8_e4m3fn"
    _DTYPE_NAMES[torch.float8_e5m2] = "float8_e5m2"
    _DTYPES_BY_NAME["float8_e4m3fn"] = torch.float8_e4m3fn
    _DTYPES_BY_NAME["float8_e5m2"] = torch.float8_e5m2


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' / 'bf16' / 'float32' ... -> torch dtype; ValueError names the choices."""
    try:
        return _DTYPES_BY_NAME[str(name).lower()]
    except KeyError:
        choices = ", ".join(sorted(k for k in _DTYPES_BY_NAME if "float" in k))
        raise ValueError(f"unknown dtype '{name}' (choose one of {choices})") from None


def open_checkpoint(path: str | Path, *, base: "Checkpoint | str | Path | None" = None) -> Checkpoint:
    """Open any supported checkpoint lazily; `base` is needed for LoRA adapters."""
    from .formats import open_path

    return open_path(Path(path), base=base)
