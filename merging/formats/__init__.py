"""Readers (and the writer) for checkpoint formats; `open_path` picks the reader.

A file or folder is recognised by name and content:
- `*.safetensors` file                       -> SafetensorsFile
- folder with `model.safetensors.index.json`  -> ShardedSafetensors
- folder with one `*.safetensors` file        -> SafetensorsFile (diffusers-style too)
- `*.bin` / `*.pt` / `*.pth` file             -> TorchPickleFile (weights_only=True)
- folder with `pytorch_model.bin.index.json`  -> ShardedTorchPickle
- folder with `adapter_config.json`           -> LoraAdapter (needs the base)
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint
from ..errors import CheckpointError


def open_path(path: Path, *, base: "Checkpoint | str | Path | None" = None) -> Checkpoint:
    from .detect import open_detected

    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    return open_detected(path, base=base)
