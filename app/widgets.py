"""Small widgets shared by the panels: inline message banner, drop zone, drag-and-drop helpers."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QMimeData, Qt, QTimer, Signal
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .resources import icon, set_icon


def local_paths(mime: QMimeData | None) -> list[Path]:
    """The local files and folders in a drag (URLs from a file manager)."""
    if mime is None or not mime.hasUrls():
        return []
    return [Path(url.toLocalFile()) for url in mime.urls() if url.isLocalFile() and url.toLocalFile()]


def accept_file_drop(event: QDragEnterEvent | QDropEvent) -> list[Path]:
    """Accept a drag or drop that carries local files and return them; ignore it (and return []) otherwise.

    The drop handler decides what each file is.
    """
    paths = local_paths(event.mimeData())
    if paths:
        event.setDropAction(Qt.DropAction.CopyAction)
        event.accept()
    else:
        event.ignore()
    return paths


def accept_file_drag(event: QDragEnterEvent) -> bool:
    """Accept a drag that carries local files."""
    return bool(accept_file_drop(event))


class MessageBanner(QFrame):
    """An inline message above a panel (error / warning / info), closable, never a modal surprise."""

    closed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("Banner")
        self.setProperty("kind", "info")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(8, 4, 4, 4)
        self.icon_label = QLabel()
        self.icon_label.setFixedSize(18, 18)
        self.text = QLabel()
        self.text.setWordWrap(True)
        self.text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.text.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        close = QToolButton()
        close.setText("✕")
        close.setAutoRaise(True)
        close.setToolTip("Dismiss")
        close.clicked.connect(self.dismiss)
        layout.addWidget(self.icon_label, 0, Qt.AlignmentFlag.AlignTop)
        layout.addWidget(self.text, 1)
        layout.addWidget(close, 0, Qt.AlignmentFlag.AlignTop)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.dismiss)
        self.hide()

    def show_message(self, text: str, kind: str = "error", timeout_ms: int = 0) -> None:
        self.setProperty("kind", kind)
        self.style().unpolish(self)
        self.style().polish(self)
        name = {"error": "error", "warning": "error", "info": "info", "ok": "ok"}.get(kind, "info")
        self.icon_label.setPixmap(icon(name).pixmap(18, 18))
        self.text.setText(text)
        self.setToolTip(text)
        self.show()
        if timeout_ms > 0:
            self._timer.start(timeout_ms)
        else:
            self._timer.stop()

    @property
    def message(self) -> str:
        return self.text.text() if self.isVisible() or self.text.text() else ""

    def dismiss(self) -> None:
        self.hide()
        self.text.setText("")
        self.closed.emit()


class DropZone(QFrame):
    """The empty workspace: a large target for files and folders, with the two ways to start."""

    paths_dropped = Signal(list)
    add_files = Signal()
    add_folder = Signal()
    open_demo = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("DropZone")
        self.setAcceptDrops(True)
        self.setMinimumHeight(150)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(24, 18, 24, 18)
        outer.addStretch(1)
        self.glyph = QLabel()
        self.glyph.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.glyph.setPixmap(icon("drop").pixmap(44, 44))
        title = QLabel("Drop checkpoints here")
        title.setObjectName("DropTitle")
        title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        hint = QLabel(
            "safetensors files, sharded Hugging Face folders, .bin / .pt files or PEFT LoRA folders — "
            "or a recipe (.yaml) to open it"
        )
        hint.setObjectName("Muted")
        hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        hint.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        self.add_files_button = set_icon(QPushButton("Add files…"), "add")
        self.add_folder_button = set_icon(QPushButton("Add folder…"), "folder")
        self.demo_button = set_icon(QPushButton("Open demo"), "demo", "#ffffff")
        self.demo_button.setObjectName("Primary")
        self.demo_button.setToolTip("Train three small digit classifiers and a base (about 10 s, once) and load them with a TIES recipe")
        self.add_files_button.clicked.connect(self.add_files)
        self.add_folder_button.clicked.connect(self.add_folder)
        self.demo_button.clicked.connect(self.open_demo)
        for b in (self.add_files_button, self.add_folder_button, self.demo_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        outer.addWidget(self.glyph)
        outer.addWidget(title)
        outer.addWidget(hint)
        outer.addSpacing(8)
        outer.addLayout(buttons)
        outer.addStretch(1)

    def refresh_icons(self) -> None:
        self.glyph.setPixmap(icon("drop").pixmap(44, 44))

    def _set_dragging(self, on: bool) -> None:
        self.setProperty("dragging", "true" if on else "false")
        self.style().unpolish(self)
        self.style().polish(self)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if accept_file_drag(event):
            self._set_dragging(True)

    def dragMoveEvent(self, event) -> None:
        accept_file_drag(event)

    def dragLeaveEvent(self, event) -> None:
        self._set_dragging(False)

    def dropEvent(self, event: QDropEvent) -> None:
        self._set_dragging(False)
        paths = accept_file_drop(event)
        if paths:
            self.paths_dropped.emit(paths)
