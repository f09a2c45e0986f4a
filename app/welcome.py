"""The first-run welcome: where to start (Open demo, or drop checkpoints), shown once per user.

Whether it was shown is remembered in the app's settings. It is never shown
when `ALLOY_NO_WELCOME=1` is set, nor under pytest, so scripted runs and tests
see the plain window.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from .resources import app_icon

SHOWN_KEY = "welcome/shown"
DISABLE_ENV = "ALLOY_NO_WELCOME"

WELCOME_HTML = """
<h2>Welcome to Alloy</h2>
<p>Alloy merges fine-tuned checkpoints of one model into a single model that keeps their skills.</p>
<ul>
<li><b>Open demo</b> trains three small digit classifiers and their base (about 10 s, once) and loads them
with a TIES recipe: press <b>Merge</b> and compare the scores.</li>
<li><b>Drag and drop</b> your own checkpoints anywhere on the window: <code>.safetensors</code> files,
Hugging Face model folders, sharded checkpoints, <code>.bin</code>/<code>.pt</code> files or LoRA adapters.
Mark one row as the base.</li>
<li>Every merge writes a <code>recipe.yaml</code> beside the weights; <code>alloy merge recipe.yaml</code>
repeats it from the command line.</li>
</ul>
"""


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def welcome_disabled() -> bool:
    """True when the environment asks for no welcome (the variable, or a pytest run)."""
    return _truthy(os.environ.get(DISABLE_ENV, "")) or "PYTEST_CURRENT_TEST" in os.environ


def should_show_welcome(settings: Any) -> bool:
    """First run for this user, and not disabled. `settings` is an `AppSettings` (value / set_value)."""
    return not welcome_disabled() and not _truthy(settings.value(SHOWN_KEY, False))


class WelcomeDialog(QDialog):
    """A short text and two buttons: Open demo (the suggested start) and Close."""

    open_demo_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("WelcomeDialog")
        self.setWindowTitle("Welcome to Alloy")
        self.setMinimumWidth(520)
        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        glyph = QLabel()
        glyph.setPixmap(app_icon().pixmap(64, 64))
        glyph.setAlignment(Qt.AlignmentFlag.AlignTop)
        row.addWidget(glyph)
        self.text = QLabel(WELCOME_HTML)
        self.text.setObjectName("WelcomeText")
        self.text.setTextFormat(Qt.TextFormat.RichText)
        self.text.setWordWrap(True)
        row.addWidget(self.text, 1)
        layout.addLayout(row)
        buttons = QDialogButtonBox()
        self.demo_button = buttons.addButton("Open demo", QDialogButtonBox.ButtonRole.AcceptRole)
        self.demo_button.setObjectName("Primary")
        self.demo_button.setDefault(True)
        self.close_button = buttons.addButton("Start with an empty window", QDialogButtonBox.ButtonRole.RejectRole)
        buttons.accepted.connect(self._open_demo)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

    def _open_demo(self) -> None:
        self.accept()
        self.open_demo_requested.emit()


def show_welcome_if_first_run(parent: QWidget | None, settings: Any,
                              open_demo: Callable[[], Any] | None = None) -> WelcomeDialog | None:
    """Show the welcome (non-blocking) on a user's first run and remember it; None when not shown."""
    if not should_show_welcome(settings):
        return None
    settings.set_value(SHOWN_KEY, True)
    if hasattr(settings, "sync"):
        settings.sync()
    dialog = WelcomeDialog(parent)
    if open_demo is not None:
        dialog.open_demo_requested.connect(lambda: open_demo())
    dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    dialog.open()
    return dialog
