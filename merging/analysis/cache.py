"""On-disk cache of analysis results, keyed by what the numbers depend on.

The key is a hash of every input file's identity (path, size, modification
time in nanoseconds) and of the analysis parameters, so editing, replacing or
touching a checkpoint invalidates its entries while reopening the same files
reuses them without reading a tensor. A checkpoint with no files (built in
memory) has no identity and is never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from .result import RESULT_VERSION, AnalysisResult

#: Bump when a change to the computation changes results for the same inputs.
ENGINE_VERSION = 1


def default_cache_dir() -> Path:
    """`$ALLOY_CACHE_DIR/analysis`, else `$XDG_CACHE_HOME/alloy/analysis`, else `~/.cache/alloy/analysis`."""
    root = os.environ.get("ALLOY_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "alloy") if xdg else os.path.join(Path.home(), ".cache", "alloy")
    return Path(root) / "analysis"


def checkpoint_identity(ckpt: Checkpoint) -> dict[str, Any] | None:
    """What identifies a checkpoint's bytes: its class and (path, size, mtime_ns) of each file."""
    files = ckpt.files()
    if not files:
        return None
    out = []
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            return None
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    ident: dict[str, Any] = {"class": type(ckpt).__name__, "path": str(Path(ckpt.path).resolve()), "files": out}
    inner = getattr(ckpt, "base", None)  # a LoRA adapter's base
    if isinstance(inner, Checkpoint):
        base_ident = checkpoint_identity(inner)
        if base_ident is None:
            return None
        ident["base"] = base_ident
    return ident


def cache_key(checkpoints: list[Checkpoint], params: dict[str, Any]) -> str | None:
    """sha256 of the inputs' identities and the parameters; None when an input cannot be identified."""
    idents = []
    for ck in checkpoints:
        ident = checkpoint_identity(ck)
        if ident is None:
            return None
        idents.append(ident)
    payload = {"result": RESULT_VERSION, "engine": ENGINE_VERSION, "inputs": idents, "params": params}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AnalysisCache:
    """A folder of `<key>.json` results; unreadable entries are treated as misses."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path_for(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> AnalysisResult | None:
        path = self.path_for(key)
        try:
            return AnalysisResult.load(path)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, result: AnalysisResult) -> None:
        """Write atomically (temporary file + rename); a cache that cannot be written is skipped."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(result.to_json())
                os.replace(tmp, self.path_for(key))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError:
            pass
