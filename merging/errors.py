"""One family of errors, each carrying a message a user can act on.

The CLI prints `str(error)` on one line and the GUI shows it in a dialog, so a
message must name the file (and tensor or recipe key) it is about.
"""

from __future__ import annotations

from pathlib import Path


class AlloyError(Exception):
    """Base of every error Alloy reports to a user instead of a traceback."""


class CheckpointError(AlloyError):
    """A checkpoint file or folder cannot be read or does not fit the merge."""

    def __init__(self, path: str | Path | None, message: str, tensor: str | None = None):
        self.path = None if path is None else Path(path)
        self.tensor = tensor
        self.detail = message
        where = f"{self.path}" if self.path is not None else "checkpoint"
        if tensor is not None:
            where += f", tensor '{tensor}'"
        super().__init__(f"{where}: {message}")


class RecipeError(AlloyError):
    """A recipe key is unknown, missing or has a bad value."""

    def __init__(self, key: str | None, message: str, source: str | Path | None = None):
        self.key = key
        self.source = source
        self.detail = message
        parts = []
        if source is not None:
            parts.append(str(source))
        if key is not None:
            parts.append(f"key '{key}'")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class MergeCancelled(AlloyError):
    """The user cancelled a running job; nothing was left at the target."""

    def __init__(self, message: str = "cancelled; nothing was written to the target"):
        super().__init__(message)


class ExportError(AlloyError):
    """Writing the output failed (disk full, permissions); temporary files were removed."""
