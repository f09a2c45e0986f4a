"""Light and dark palettes that follow the system colour scheme, and matching plot colours."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

from .resources import style_sheet


@dataclass(frozen=True)
class Colors:
    """Colours the widgets and plots use besides the palette."""

    dark: bool
    background: str
    foreground: str
    muted: str
    accent: str
    error: str
    error_bg: str
    warning_bg: str
    info_bg: str
    ok: str
    plot_background: str
    plot_foreground: str


LIGHT = Colors(False, "#f6f7f9", "#1d2129", "#6b7280", "#2f6fde", "#b42323", "#fde8e8", "#fff4d6", "#e6f0ff", "#1f8a4c", "#ffffff", "#30343c")
DARK = Colors(True, "#1e2128", "#e6e8ec", "#9aa1ad", "#5b9bff", "#ff7b7b", "#4a2326", "#4a3d1f", "#1f3352", "#4cc283", "#16181d", "#d6d9df")


def system_prefers_dark(app: QGuiApplication | None = None) -> bool:
    app = app or QGuiApplication.instance()
    if app is None:
        return False
    scheme = app.styleHints().colorScheme()
    if scheme == Qt.ColorScheme.Dark:
        return True
    if scheme == Qt.ColorScheme.Light:
        return False
    return app.palette().color(QPalette.ColorRole.Window).lightness() < 128


def _dark_palette() -> QPalette:
    p = QPalette()
    base, window, text = QColor("#16181d"), QColor("#1e2128"), QColor("#e6e8ec")
    roles = {
        QPalette.ColorRole.Window: window,
        QPalette.ColorRole.WindowText: text,
        QPalette.ColorRole.Base: base,
        QPalette.ColorRole.AlternateBase: QColor("#22262e"),
        QPalette.ColorRole.ToolTipBase: QColor("#2b2f38"),
        QPalette.ColorRole.ToolTipText: text,
        QPalette.ColorRole.PlaceholderText: QColor("#8a909b"),
        QPalette.ColorRole.Text: text,
        QPalette.ColorRole.Button: QColor("#2a2e37"),
        QPalette.ColorRole.ButtonText: text,
        QPalette.ColorRole.BrightText: QColor("#ff7b7b"),
        QPalette.ColorRole.Highlight: QColor("#3d7be0"),
        QPalette.ColorRole.HighlightedText: QColor("#ffffff"),
        QPalette.ColorRole.Link: QColor("#7fb2ff"),
        QPalette.ColorRole.LinkVisited: QColor("#b29bff"),
        QPalette.ColorRole.Light: QColor("#3a3f4a"),
        QPalette.ColorRole.Midlight: QColor("#30343d"),
        QPalette.ColorRole.Mid: QColor("#262a32"),
        QPalette.ColorRole.Dark: QColor("#121418"),
        QPalette.ColorRole.Shadow: QColor("#000000"),
    }
    for role, color in roles.items():
        p.setColor(role, color)
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.WindowText, QPalette.ColorRole.ButtonText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor("#6c717c"))
    return p


def _light_palette() -> QPalette:
    p = QApplication.style().standardPalette() if QApplication.style() else QPalette()
    p.setColor(QPalette.ColorRole.Window, QColor("#f6f7f9"))
    p.setColor(QPalette.ColorRole.AlternateBase, QColor("#f3f5f8"))
    p.setColor(QPalette.ColorRole.Highlight, QColor("#2f6fde"))
    p.setColor(QPalette.ColorRole.HighlightedText, QColor("#ffffff"))
    p.setColor(QPalette.ColorRole.ToolTipBase, QColor("#ffffff"))
    p.setColor(QPalette.ColorRole.ToolTipText, QColor("#1d2129"))
    p.setColor(QPalette.ColorRole.Link, QColor("#2360c9"))
    return p


class Theme(QObject):
    """Applies the palette and style sheet; `changed` fires when the system switches light/dark."""

    changed = Signal(object)  # Colors

    def __init__(self, app: QApplication, *, force: str | None = None):
        super().__init__(app)
        self.app = app
        self.force = force  # "light" / "dark" / None (follow the system)
        self.colors = LIGHT
        app.setStyle("Fusion")
        self.apply()
        app.styleHints().colorSchemeChanged.connect(lambda _scheme: self.apply())

    def apply(self) -> None:
        dark = self.force == "dark" if self.force in ("light", "dark") else system_prefers_dark(self.app)
        self.colors = DARK if dark else LIGHT
        self.app.setPalette(_dark_palette() if dark else _light_palette())
        self.app.setStyleSheet(_fill(style_sheet(), self.colors))
        self.changed.emit(self.colors)


def _fill(qss: str, colors: Colors) -> str:
    for key in sorted(colors.__dict__, key=len, reverse=True):  # @error_bg before @error
        value = getattr(colors, key)
        if isinstance(value, str):
            qss = qss.replace("@" + key, value)
    return qss


def current_colors() -> Colors:
    app = QApplication.instance()
    theme = app.findChild(Theme) if app is not None else None
    return theme.colors if theme is not None else LIGHT
