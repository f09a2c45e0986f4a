"""A torch `.bin` / `.pt` / `.pth` / `.ckpt` state dict, loaded only with `weights_only=True`.

A pickle can run arbitrary code when it is loaded; `weights_only=True` makes
torch refuse anything but tensors and plain containers, so a hostile file is
rejected before any of its code runs. Zip-format files (torch >= 1.6) are
memory-mapped, so opening reads the pickled structure but not the tensor data;
legacy non-zip files cannot be mapped and are read whole.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"  # every pickle torch.save writes starts with the PROTO opcode
# Keys under which training frameworks nest the state dict (Lightning, SD .ckpt, DeepSpeed, plain scripts).
NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module")

REFUSED_MESSAGE = "refused: the pickle wants to run code / load non-tensor objects; weights_only=True"


def _first_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(4)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read: {exc.strerror or exc}") from None


def is_zip_checkpoint(path: Path) -> bool:
    return _first_bytes(path) == ZIP_MAGIC


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch checkpoint by name, unwrapped from a nesting dict if needed."""
    path = Path(path)
    obj = _safe_torch_load(path)
    state = _unwrap(obj)
    if state is None:
        raise CheckpointError(path, f"holds no tensors (a {type(obj).__name__}, not a state dict)")
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            continue  # step counters, configs, optimizer hyper-parameters: not weights
        if value.layout != torch.strided:
            raise CheckpointError(path, f"is a {value.layout} tensor; only dense tensors can be merged", tensor=name)
        tensors[name] = value.detach()
    if not tensors:
        raise CheckpointError(path, "holds no tensors")
    return tensors


def _safe_torch_load(path: Path) -> Any:
    head = _first_bytes(path)
    mmap = head == ZIP_MAGIC
    if not mmap and not head.startswith(PICKLE_PROTO):
        raise CheckpointError(path, "is not a torch checkpoint (neither a zip archive nor a pickle)")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "WeightsUnpickler" in text:
            found = re.search(r"(Unsupported [^\n]*?)(?: was not an allowed global| Please|\.?\n|$)", text)
            reason = f" ({found.group(1).strip()})" if found else ""
            raise CheckpointError(path, REFUSED_MESSAGE + reason) from None
        raise CheckpointError(path, f"cannot be read as a torch checkpoint: {_first_line(text)}") from None
    except MemoryError:
        raise CheckpointError(path, "cannot be read as a torch checkpoint: not enough memory") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError, KeyError ... on damaged files
        raise CheckpointError(path, f"cannot be read as a torch checkpoint ({type(exc).__name__}: {_first_line(str(exc))})") from None


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no details"
    return line if len(line) <= 300 else line[:300] + "..."


def _has_tensor(mapping: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in mapping.values())


def _unwrap(obj: Any) -> Mapping | None:
    """The mapping that holds the tensors: the object itself, or one nested under a known key."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            return None
        if _has_tensor(obj):
            return obj
        inner = next((obj[k] for k in NESTED_STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return None
        obj = inner
    return None


class TorchPickleFile(Checkpoint):
    """A torch state-dict file. Names are kept exactly as stored (no prefix stripping)."""

    format = "torch"

    def __init__(self, path: str | Path, *, folder: str | Path | None = None):
        super().__init__(path)
        self._folder = None if folder is None else Path(folder)
        self._tensors: dict[str, torch.Tensor] | None = load_tensors(self.path)
        self._infos = {
            name: TensorInfo(name=name, shape=tuple(t.shape), dtype=t.dtype) for name, t in self._tensors.items()
        }

    @property
    def folder(self) -> Path:
        return self._folder if self._folder is not None else self.path.parent

    def _load(self, name: str) -> torch.Tensor:
        if self._tensors is None:
            self._tensors = load_tensors(self.path)
            missing = [n for n in self._infos if n not in self._tensors]
            if missing:
                raise CheckpointError(self.path, "changed on disk since it was opened; open it again", tensor=missing[0])
        # A copy: the loaded tensors share one mapping, and the caller may modify what it gets in place.
        return self._tensors[name].clone()

    def close(self) -> None:
        self._tensors = None
