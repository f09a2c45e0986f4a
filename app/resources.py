"""Where the style sheet and icons live, and icons drawn in the palette's text colour.

Icons are SVG files in `resources/icons` that stroke with `currentColor`; the
colour is filled in when an icon is made, so they read on light and dark
palettes alike.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PySide6.QtCore import QByteArray, QSize, Qt
from PySide6.QtGui import QColor, QIcon, QPainter, QPixmap
from PySide6.QtSvg import QSvgRenderer


def resources_dir() -> Path:
    """`resources/` beside the packages (a source checkout or a frozen app's data folder)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "resources", here / "resources"):
        if candidate.is_dir():
            return candidate
    return here.parent / "resources"


def style_sheet() -> str:
    try:
        return (resources_dir() / "style.qss").read_text(encoding="utf-8")
    except OSError:
        return ""


@lru_cache(maxsize=256)
def _svg_pixmap(name: str, color: str, size: int, ratio: float) -> QPixmap:
    path = resources_dir() / "icons" / f"{name}.svg"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return QPixmap()
    renderer = QSvgRenderer(QByteArray(text.replace("currentColor", color).encode("utf-8")))
    pixmap = QPixmap(int(size * ratio), int(size * ratio))
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    renderer.render(painter)
    painter.end()
    pixmap.setDevicePixelRatio(ratio)
    return pixmap


def icon(name: str, color: QColor | str | None = None) -> QIcon:
    """An icon from resources/icons, stroked in `color` (default: the palette's text colour)."""
    from PySide6.QtWidgets import QApplication

    if color is None:
        app = QApplication.instance()
        color = app.palette().color(app.palette().ColorRole.WindowText) if app is not None else QColor("#333")
    col = QColor(color).name()
    app = QApplication.instance()
    ratio = app.devicePixelRatio() if app is not None else 1.0
    result = QIcon()
    for size in (16, 24, 32, 48):
        result.addPixmap(_svg_pixmap(name, col, size, ratio))
    disabled = QColor(col)
    disabled.setAlphaF(0.35)
    for size in (16, 24, 32):
        result.addPixmap(_svg_pixmap(name, disabled.name(QColor.NameFormat.HexArgb), size, ratio), QIcon.Mode.Disabled)
    return result


_THEMED: list[tuple[object, str, str | None]] = []


def set_icon(target, name: str, color: str | None = None):
    """Give a button or action an icon that is redrawn in the new text colour when the palette changes."""
    target.setIcon(icon(name, color))
    _THEMED.append((target, name, color))
    return target


def refresh_icons() -> None:
    """Redraw every icon set with `set_icon` (after a light/dark switch); forget deleted widgets."""
    import shiboken6

    alive = []
    for target, name, color in _THEMED:
        if shiboken6.isValid(target):
            target.setIcon(icon(name, color))
            alive.append((target, name, color))
    _THEMED[:] = alive


def app_icon() -> QIcon:
    """The application icon: `alloy.svg` (the packaged icon) when present, else `app.svg`."""
    name = "alloy" if (resources_dir() / "icons" / "alloy.svg").is_file() else "app"
    result = QIcon()
    for size in (16, 32, 48, 64, 128, 256):
        result.addPixmap(_svg_pixmap(name, "#000", size, 1.0))
    return result


def icon_size() -> QSize:
    return QSize(20, 20)
