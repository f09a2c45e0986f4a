"""Remembered between runs (QSettings): window geometry and splitters, last folders, recent recipes."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings

ORGANIZATION = "Alloy"
APPLICATION = "Alloy"
MAX_RECENT = 8


def default_settings() -> QSettings:
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORGANIZATION, APPLICATION)


class AppSettings:
    """Typed access to the few things the window remembers."""

    def __init__(self, store: QSettings | None = None):
        self.store = store if store is not None else default_settings()

    # -- folders ----------------------------------------------------------------------
    def last_folder(self, kind: str) -> str:
        """Last folder used for `kind` ('checkpoints', 'recipes', 'output', 'export'), else home."""
        value = self.store.value(f"folders/{kind}", "")
        if isinstance(value, str) and value and Path(value).is_dir():
            return value
        return str(Path.home())

    def set_last_folder(self, kind: str, path: str | Path) -> None:
        p = Path(path)
        self.store.setValue(f"folders/{kind}", str(p if p.is_dir() else p.parent))

    # -- recent recipes -----------------------------------------------------------------
    def recent_recipes(self) -> list[str]:
        value = self.store.value("recent/recipes", [])
        if isinstance(value, str):
            value = [value]
        return [v for v in (value or []) if isinstance(v, str) and Path(v).is_file()]

    def add_recent_recipe(self, path: str | Path) -> None:
        path = str(Path(path).absolute())
        items = [p for p in self.recent_recipes() if p != path]
        self.store.setValue("recent/recipes", [path, *items][:MAX_RECENT])

    def clear_recent_recipes(self) -> None:
        self.store.setValue("recent/recipes", [])

    # -- window state -----------------------------------------------------------------
    def save_bytes(self, key: str, data: QByteArray) -> None:
        self.store.setValue(f"window/{key}", data)

    def load_bytes(self, key: str) -> QByteArray | None:
        value = self.store.value(f"window/{key}")
        return value if isinstance(value, QByteArray) and not value.isEmpty() else None

    def value(self, key: str, default=None):
        return self.store.value(key, default)

    def set_value(self, key: str, value) -> None:
        self.store.setValue(key, value)

    def sync(self) -> None:
        self.store.sync()
