"""Writing a model folder that is either complete or absent.

Everything is written into a hidden staging folder beside the target and
renamed into place only when complete, so a Cancel, an exception or a killed
process never leaves a half-written model where a finished one is expected.
Replacing an existing output exchanges the two folders in one atomic step where
the system can (Linux `renameat2`, macOS `renamex_np`); elsewhere it takes two
renames, and a kill between them leaves the previous output in a staging folder
that `clean_stale_staging` puts back.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
import yaml

from .checkpoint import Checkpoint, dtype_name
from .errors import AlloyError, ExportError
from .formats.safetensors_writer import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedSafetensorsWriter
from .progress import CancelToken, ProgressCallback, ProgressTracker

if TYPE_CHECKING:
    from .recipe import Recipe

RECIPE_FILE = "alloy_recipe.yaml"
MERGEKIT_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"
STAGING_PREFIX = ".alloy-staging-"
# Ends the name of a replaced output parked during a two-rename replace; never ends a mkdtemp name.
REPLACED_SUFFIX = ".REPLACED"

# Files copied beside the weights from the model that provides config/tokenizer.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "chat_template.jinja",
    "model_index.json",
    "scheduler_config.json",
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (transformers' convention: GB = 10⁹)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError("size must be positive")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"cannot read size '{text}' (examples: 5GB, 500MB, 2GiB)")
    unit = (match.group(2) or "").lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in '{text}'")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError("size must be positive")
    return value


class StagedFolder:
    """Context manager: a staging folder that becomes `target` on commit, or vanishes.

    `overwrite=False` refuses to replace a non-empty existing target up front.
    """

    def __init__(self, target: str | Path, *, overwrite: bool = False):
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.path: Path | None = None
        self._committed = False

    def __enter__(self) -> "StagedFolder":
        if self.target.exists():
            if not self.target.is_dir():
                raise ExportError(f"{self.target}: exists and is not a folder")
            if any(self.target.iterdir()) and not self.overwrite:
                raise ExportError(f"{self.target}: folder exists and is not empty (choose another folder or allow overwriting)")
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.target.name}-", dir=parent))
        except OSError as exc:
            raise ExportError(f"{parent}: cannot create the output folder: {exc.strerror or exc}") from None
        return self

    def commit(self) -> Path:
        """Move the finished staging folder into place (replacing an old output last)."""
        assert self.path is not None
        _fsync_tree(self.path)
        old: Path | None = None
        if self.target.exists():
            if _exchange(self.path, self.target):  # the staging folder now holds the old output
                self._committed = True
                shutil.rmtree(self.path, ignore_errors=True)
                return self.target
            old = self.target.with_name(f"{STAGING_PREFIX}{self.target.name}-{uuid.uuid4().hex[:8]}{REPLACED_SUFFIX}")
            os.rename(self.target, old)
        try:
            os.rename(self.path, self.target)
        except OSError:
            if old is not None:
                os.rename(old, self.target)
            raise
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if exc_type is not None and issubclass(exc_type, OSError) and not issubclass(exc_type, AlloyError):
            raise _export_error(exc, self.target) from None


def _export_error(exc: OSError, target: Path) -> ExportError:
    if exc.errno == errno.ENOSPC:
        return ExportError(f"{target}: the disk is full; nothing was written (free space and try again)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ExportError(f"{target}: no permission to write here ({exc.strerror})")
    return ExportError(f"{target}: writing failed: {exc.strerror or exc}")


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _exchange_call():
    """The C function that swaps two paths atomically, or None where the system has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux"):
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            at_fdcwd, rename_exchange = -100, 2
            return lambda a, b: fn(at_fdcwd, a, at_fdcwd, b, rename_exchange)
        if sys.platform == "darwin":
            fn = libc.renamex_np
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            rename_swap = 2
            return lambda a, b: fn(a, b, rename_swap)
    except (OSError, AttributeError):
        pass
    return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system or file system cannot."""
    call = _exchange_call()
    if call is None:
        return False
    if call(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def clean_stale_staging(parent: str | Path) -> list[Path]:
    """Remove staging folders a killed export left behind in `parent`.

    A previous output parked by a replace that was killed between its two
    renames is put back at its name instead, when nothing is there.
    """
    removed = []
    parent = Path(parent)
    if parent.is_dir():
        for p in sorted(parent.iterdir()):
            if not (p.name.startswith(STAGING_PREFIX) and p.is_dir()):
                continue
            if p.name.endswith(REPLACED_SUFFIX):
                original = parent / p.name[len(STAGING_PREFIX) : -len(REPLACED_SUFFIX) - 9]
                if not os.path.lexists(original):
                    os.rename(p, original)
                    continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def copy_side_files(source_folder: Path | None, dest: Path, *, names: Iterable[str] = SIDE_FILES) -> list[str]:
    """Copy config, generation and tokenizer files that exist in `source_folder`."""
    copied = []
    if source_folder is None or not source_folder.is_dir():
        return copied
    for name in names:
        src = source_folder / name
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    return copied


@dataclass
class CardInfo:
    """What the model card says about a merge."""

    method_title: str
    method_name: str
    base_model: str | None
    models: list[str]
    recipe_yaml: str
    library_name: str | None = None
    license: str | None = None
    name: str | None = None
    extra_tags: list[str] = field(default_factory=list)


def model_reference(path: Path) -> str:
    """How a card names an input: its Hub id when config.json records one, else the folder name."""
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
            ref = data.get("_name_or_path") if isinstance(data, dict) else None
            if isinstance(ref, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
                return ref
        except (OSError, ValueError):
            pass
    return path.name if path.is_dir() else path.stem


def library_for(config: dict | None) -> str | None:
    if not config:
        return None
    if "_class_name" in config or "_diffusers_version" in config:
        return "diffusers"
    if "architectures" in config and "transformers_version" in config:
        return "transformers"
    return None


def model_card(info: CardInfo) -> str:
    front: dict[str, object] = {}
    bases = [info.base_model] if info.base_model else []
    bases += [m for m in info.models if m not in bases]
    front["base_model"] = bases
    front["tags"] = ["merge", "alloy", *info.extra_tags]
    if info.library_name:
        front["library_name"] = info.library_name
    if info.license:
        front["license"] = info.license
    title = info.name or "Merged model"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        f"# {title}",
        "",
        f"This model is a merge of pre-trained language or vision models made with Alloy, using the {info.method_title} method.",
        "",
        "## Merge method",
        "",
        f"`{info.method_name}`" + (f" with `{info.base_model}` as the base." if info.base_model else " (no base model)."),
        "",
        "## Models merged",
        "",
        *[f"- {m}" for m in info.models],
        "",
        "## Configuration",
        "",
        f"The recipe below (also saved as `{RECIPE_FILE}`) reproduces this merge with `alloy merge {RECIPE_FILE} -o OUT`:",
        "",
        "```yaml",
        info.recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_recipe_files(dest: Path, recipe: "Recipe", *, license: str | None = None, checkpoint_config: dict | None = None) -> None:
    """The recipe, a mergekit copy when mergekit can run it, and the model card."""
    recipe_yaml = recipe.to_yaml()
    (dest / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    if recipe.is_mergekit_compatible():
        (dest / MERGEKIT_FILE).write_text(recipe.to_mergekit_yaml(), encoding="utf-8")
    info = CardInfo(
        method_title=recipe.method.title or recipe.merge_method,
        method_name=recipe.merge_method,
        base_model=model_reference(recipe.base_model) if recipe.base_model else None,
        models=[model_reference(m.path) + (f"+{m.lora.name}" if m.lora else "") for m in recipe.models],
        recipe_yaml=recipe_yaml,
        library_name=library_for(checkpoint_config),
        license=license,
        name=recipe.name,
    )
    (dest / CARD_FILE).write_text(model_card(info), encoding="utf-8")


def export_checkpoint(
    checkpoint: Checkpoint,
    target: str | Path,
    *,
    dtype: torch.dtype | None = None,
    shard_size: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    extra_files: dict[str, str] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Re-write any checkpoint as (sharded) safetensors, streaming, with its side files.

    `dtype` converts floating-point tensors only; integer buffers keep their type.
    """
    infos = checkpoint.infos()
    planned = [PlannedTensor(n, i.shape, dtype if (dtype is not None and i.is_float) else i.dtype) for n, i in infos.items()]
    tracker = ProgressTracker("write", len(planned), sum(i.nbytes for i in infos.values()), progress, cancel)
    with StagedFolder(target, overwrite=overwrite) as staged:
        assert staged.path is not None
        writer = ShardedSafetensorsWriter(staged.path, planned, max_shard_bytes=shard_size, metadata=metadata)
        try:
            for p in planned:
                tensor = checkpoint.get(p.name)
                writer.write(p.name, tensor.to(p.dtype))
                tracker.step(infos[p.name].nbytes, p.name)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        copy_side_files(checkpoint.folder, staged.path)
        for name, text in (extra_files or {}).items():
            (staged.path / name).write_text(text, encoding="utf-8")
        return staged.commit()


def describe_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(sorted({dtype_name(d) for d in dtypes}))
