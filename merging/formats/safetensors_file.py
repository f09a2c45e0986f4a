"""A single `.safetensors` file, read lazily after its header has been validated.

The header is parsed here rather than trusted to a library so that every way a
file can lie (sizes, offsets, dtypes, duplicate names, truncation) becomes one
message naming the file and the tensor. Tensor data is read on demand with a
plain positioned read into a fresh buffer, so the caller owns the returned
tensor, and a file truncated by another program during a merge is an error
rather than a crash (a memory map would raise SIGBUS).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import CheckpointError
from .st_dtypes import SAFETENSORS_TO_TORCH

# The safetensors library refuses headers above this size; so do we.
MAX_HEADER_BYTES = 100_000_000
_MAX_DIM = 2**62  # torch sizes are int64; larger dims only appear in forged headers


@dataclass(frozen=True)
class TensorEntry:
    """One validated header entry; offsets are relative to the data area."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A header that passed every check: entries tile the data area exactly."""

    header_len: int
    file_size: int
    metadata: dict[str, str]
    entries: dict[str, TensorEntry]  # in data order

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice; `json` would silently keep the last one."""

    def __init__(self, key: str, values: list[Any]):
        super().__init__(f"duplicate key {key!r}")
        self.key = key
        self.values = values


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise DuplicateKeyError(key, [seen[key], value])
            seen[key] = value
    return result


def loads_strict_json(text: str) -> Any:
    """`json.loads` that raises DuplicateKeyError instead of keeping the last of two equal keys."""
    return json.loads(text, object_pairs_hook=_pairs_without_duplicates)


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass; JSON true is not a size


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file; never reads tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            if file_size < 8:
                raise CheckpointError(path, f"too short to be a safetensors file ({file_size} bytes; the 8-byte header length is missing)")
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    path,
                    f"header length field says {header_len} bytes, more than the {MAX_HEADER_BYTES}-byte limit: "
                    "not a safetensors file, or a corrupted one",
                )
            if 8 + header_len > file_size:
                raise CheckpointError(
                    path,
                    f"header length field says {header_len} bytes but only {file_size - 8} bytes follow it: "
                    "the file is truncated or not a safetensors file",
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read: {exc.strerror or exc}") from None
    if len(raw) != header_len:
        raise CheckpointError(path, "the file shrank while its header was read")
    return _parse_header(path, raw, file_size)


def _parse_header(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(path, f"header is not valid UTF-8 (byte {exc.start}): not a safetensors file, or a corrupted one") from None
    if not text.startswith("{"):
        raise CheckpointError(path, "header does not start with '{': not a safetensors file, or a corrupted one")
    try:
        top = loads_strict_json(text)
    except DuplicateKeyError as dup:
        is_entry = any(isinstance(v, dict) for v in dup.values) and dup.key != "__metadata__"
        raise CheckpointError(
            path, f"header names '{dup.key}' twice", tensor=dup.key if is_entry else None
        ) from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(top, dict):
        raise CheckpointError(path, "header is not a JSON object")

    metadata = top.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "header '__metadata__' is not an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointError(path, f"header '__metadata__' value for '{key}' is not a string")

    header_len = len(raw)
    data_len = file_size - 8 - header_len
    entries = [_parse_entry(path, name, spec) for name, spec in top.items()]
    entries.sort(key=lambda e: (e.begin, e.end, e.name))
    for entry in entries:
        if entry.end > data_len:
            raise CheckpointError(
                path,
                f"data_offsets [{entry.begin}, {entry.end}] reach past the end of the file "
                f"(the data area holds {data_len} bytes): the file is truncated or its header is wrong",
                tensor=entry.name,
            )
    covered = 0
    previous: TensorEntry | None = None
    for entry in entries:
        if entry.begin < covered:
            other = f" tensor '{previous.name}'" if previous is not None else ""
            raise CheckpointError(
                path, f"data_offsets [{entry.begin}, {entry.end}] overlap{other} (which ends at {covered})", tensor=entry.name
            )
        if entry.begin > covered:
            raise CheckpointError(
                path, f"data_offsets [{entry.begin}, {entry.end}] leave {entry.begin - covered} unused bytes before the tensor", tensor=entry.name
            )
        covered = entry.end
        previous = entry
    if covered != data_len:
        raise CheckpointError(
            path, f"{data_len - covered} bytes after the last tensor belong to no tensor: the header and the file size disagree"
        )
    return SafetensorsHeader(
        header_len=header_len,
        file_size=file_size,
        metadata=dict(metadata),
        entries={e.name: e for e in entries},
    )


def _parse_entry(path: Path, name: str, spec: Any) -> TensorEntry:
    if not isinstance(spec, dict):
        raise CheckpointError(path, "header entry is not an object", tensor=name)
    code = spec.get("dtype")
    if not isinstance(code, str) or code not in SAFETENSORS_TO_TORCH:
        supported = ", ".join(SAFETENSORS_TO_TORCH)
        raise CheckpointError(path, f"unsupported dtype {code!r} (supported: {supported})", tensor=name)
    dtype = SAFETENSORS_TO_TORCH[code]
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < _MAX_DIM for d in shape):
        raise CheckpointError(path, f"shape {shape!r} is not a list of integers in [0, 2**62)", tensor=name)
    offsets = spec.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(path, f"data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end", tensor=name)
    begin, end = offsets
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise CheckpointError(
            path,
            f"data_offsets [{begin}, {end}] span {end - begin} bytes but shape {shape} of {code} needs {needed} bytes",
            tensor=name,
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


class SafetensorsFile(Checkpoint):
    """One `.safetensors` file; opening reads and validates the header only."""

    format = "safetensors"

    def __init__(self, path: str | Path, *, folder: str | Path | None = None):
        super().__init__(path)
        self._folder = None if folder is None else Path(folder)
        self._header = read_header(self.path)
        self._infos = {
            e.name: TensorInfo(name=e.name, shape=e.shape, dtype=e.dtype) for e in self._header.entries.values()
        }

    @property
    def header(self) -> SafetensorsHeader:
        return self._header

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` block (str -> str), e.g. `format` or an embedded merge recipe."""
        return dict(self._header.metadata)

    @property
    def folder(self) -> Path:
        return self._folder if self._folder is not None else self.path.parent

    def _load(self, name: str) -> torch.Tensor:
        entry = self._header.entries[name]
        self._check_unchanged(name)
        if entry.nbytes == 0:
            try:
                return torch.empty(entry.shape, dtype=entry.dtype)
            except (RuntimeError, ValueError, OverflowError) as exc:
                raise CheckpointError(self.path, f"shape {list(entry.shape)} cannot be allocated: {exc}", tensor=name) from None
        start = self._header.data_start + entry.begin
        # A plain read into memory we own, not a memory map: a file truncated by
        # another program mid-merge then gives a short read (an error message)
        # instead of SIGBUS killing the whole process.
        data = self._read_copy(name, start, entry.nbytes)
        return data.view(entry.dtype).view(entry.shape)

    def _read_bytes_into(self, name: str, out: torch.Tensor) -> bool:
        entry = self._header.entries[name]
        self._check_unchanged(name)
        if entry.nbytes:
            self._read_exact(name, self._header.data_start + entry.begin, out.reshape(-1).view(torch.uint8))
        return True

    def _read_copy(self, name: str, start: int, nbytes: int) -> torch.Tensor:
        data = torch.empty(nbytes, dtype=torch.uint8)
        self._read_exact(name, start, data)
        return data

    def _read_exact(self, name: str, start: int, data: torch.Tensor) -> None:
        """Fill the byte tensor `data` from `start`; loops because one read(2) returns at most ~2 GiB."""
        nbytes = data.numel()
        view = memoryview(data.numpy())
        got = 0
        try:
            with open(self.path, "rb", buffering=0) as fh:
                fh.seek(start)
                while got < nbytes:
                    n = fh.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot read the tensor data: {exc.strerror or exc}", tensor=name) from None
        if got != nbytes:
            raise CheckpointError(self.path, "the file ended before the tensor data did (was it changed during the merge?)", tensor=name)

    def _check_unchanged(self, name: str) -> None:
        """A file that changed size since open no longer matches its header; refuse to read it."""
        try:
            size = os.stat(self.path).st_size
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot be read any more: {exc.strerror or exc}", tensor=name) from None
        if size != self._header.file_size:
            raise CheckpointError(
                self.path,
                f"changed on disk since it was opened (was {self._header.file_size} bytes, now {size}); open it again",
                tensor=name,
            )
