"""Pick the reader for a dropped file or folder, by name first and by content when the name says nothing."""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHT_FILES, LoraAdapter, is_adapter_folder
from .safetensors_file import MAX_HEADER_BYTES, SafetensorsFile
from .sharded import ShardedSafetensors, ShardedTorchPickle
from .torch_pickle import ZIP_MAGIC, TorchPickleFile

NOT_A_CHECKPOINT = "not a checkpoint (expected .safetensors, .bin/.pt, a Hugging Face folder or a PEFT adapter folder)"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Preferred single-file names when a folder holds variants (e.g. `diffusion_pytorch_model.fp16.safetensors`).
CANONICAL_SAFETENSORS = ("model.safetensors", "diffusion_pytorch_model.safetensors")
CANONICAL_TORCH = ("pytorch_model.bin", "diffusion_pytorch_model.bin")
# Pickles a training run leaves beside the weights; they hold no model weights.
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt")
# Torch's legacy (non-zip) format starts with pickle protocol 2 and its magic number as a LONG1.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def open_detected(path: Path, *, base: Checkpoint | str | Path | None = None) -> Checkpoint:
    """Open `path` with the reader its name or content calls for; `base` is used by LoRA adapters only."""
    path = Path(path)
    if path.is_dir():
        return _open_folder(path, base)
    return _open_file(path, base)


def _open_file(path: Path, base: Checkpoint | str | Path | None) -> Checkpoint:
    name = path.name
    if name == ADAPTER_CONFIG or (name in ADAPTER_WEIGHT_FILES and is_adapter_folder(path.parent)):
        return LoraAdapter(path.parent, base=base)
    if name.endswith(".safetensors.index.json"):
        return ShardedSafetensors(path.parent, name)
    if name.endswith(".bin.index.json"):
        return ShardedTorchPickle(path.parent, name)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsFile(path)
    if suffix in TORCH_SUFFIXES:
        return TorchPickleFile(path)
    sniffed = sniff(path)
    if sniffed == "safetensors":
        return SafetensorsFile(path)
    if sniffed == "torch":
        return TorchPickleFile(path)
    raise CheckpointError(path, NOT_A_CHECKPOINT)


def sniff(path: Path) -> str | None:
    """'safetensors', 'torch' or None, from the first bytes of a file with an unhelpful name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            size = fh.seek(0, 2)
    except OSError:
        return None
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as zf:
                if any(n.endswith("data.pkl") for n in zf.namelist()):
                    return "torch"
        except (zipfile.BadZipFile, OSError, ValueError):
            return "torch"  # damaged zip with a torch-like start: let the torch reader say what is wrong
        return None
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch"
    return None


def _listing(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths)


def _pick_single(folder: Path, files: list[Path], canonical: tuple[str, ...], kind: str) -> Path | None:
    if not files:
        return None
    for name in canonical:
        if (folder / name) in files:
            return folder / name
    if len(files) == 1:
        return files[0]
    raise CheckpointError(
        folder,
        f"holds several {kind} files and no index to say how they fit together: {_listing(files)}; "
        "open the one you mean directly",
    )


def _open_folder(folder: Path, base: Checkpoint | str | Path | None) -> Checkpoint:
    if is_adapter_folder(folder):
        return LoraAdapter(folder, base=base)
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    st_indexes = [p for p in entries if p.name.endswith(".safetensors.index.json")]
    index = _pick_single(folder, st_indexes, ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json"), "safetensors index")
    if index is not None:
        return ShardedSafetensors(folder, index.name)

    safetensors = [p for p in entries if p.suffix == ".safetensors"]
    single = _pick_single(folder, safetensors, CANONICAL_SAFETENSORS, ".safetensors")
    if single is not None:
        return SafetensorsFile(single, folder=folder)

    bin_indexes = [p for p in entries if p.name.endswith(".bin.index.json")]
    index = _pick_single(folder, bin_indexes, ("pytorch_model.bin.index.json", "diffusion_pytorch_model.bin.index.json"), "torch index")
    if index is not None:
        return ShardedTorchPickle(folder, index.name)

    pickles = [
        p for p in entries
        if p.suffix.lower() in TORCH_SUFFIXES and p.name not in NOT_WEIGHTS and not p.name.startswith("rng_state")
    ]
    single = _pick_single(folder, pickles, CANONICAL_TORCH, "torch checkpoint")
    if single is not None:
        return TorchPickleFile(single, folder=folder)

    if (folder / "model_index.json").is_file():
        parts = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise CheckpointError(
            folder, f"is a diffusers pipeline folder; open one of its component folders ({', '.join(parts)})"
        )
    raise CheckpointError(folder, f"holds no weights: {NOT_A_CHECKPOINT}")
