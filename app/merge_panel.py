"""The merge bar: output folder, Merge / Cancel, live progress, and the summary when it is done."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .resources import set_icon
from .workspace import human_bytes, human_seconds

STAGE_NAMES = {
    "align": "Aligning models",
    "prepare": "Measuring the whole model (global scope)",
    "merge": "Merging",
    "write": "Writing",
    "analyze": "Measuring retention",
}


def describe_progress(event: Any) -> str:
    """'Merging · 12 / 40 tensors · 1.2 GB of 3.4 GB · 5 s left'."""
    stage = STAGE_NAMES.get(getattr(event, "stage", ""), str(getattr(event, "stage", "")).capitalize())
    parts = [stage]
    if getattr(event, "total", 0):
        parts.append(f"{event.done:,} / {event.total:,} tensors" if event.stage != "align" else f"{event.done} / {event.total} models")
    if getattr(event, "bytes_total", 0):
        parts.append(f"{human_bytes(event.bytes_done)} of {human_bytes(event.bytes_total)}")
    eta = getattr(event, "eta_s", None)
    if eta is not None and getattr(event, "fraction", 0) < 1.0:
        parts.append(f"{human_seconds(eta)} left")
    elif getattr(event, "elapsed_s", 0):
        parts.append(f"{human_seconds(event.elapsed_s)} elapsed")
    return " · ".join(parts)


class MergePanel(QFrame):
    merge_requested = Signal()
    cancel_requested = Signal()
    browse_requested = Signal()
    open_folder_requested = Signal()
    export_requested = Signal()
    hub_requested = Signal()

    PAGE_IDLE, PAGE_RUNNING, PAGE_DONE = range(3)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("MergeBar")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(8, 6, 8, 6)
        layout.setSpacing(6)

        row = QHBoxLayout()
        out_label = QLabel("Output folder")
        out_label.setToolTip("Where the merged model is written (a new folder; it appears only when the merge is complete).")
        row.addWidget(out_label)
        self.output = QLineEdit()
        self.output.setObjectName("OutputFolder")
        self.output.setPlaceholderText("choose a folder for the merged model")
        self.output.setToolTip(out_label.toolTip())
        row.addWidget(self.output, 1)
        self.browse = QToolButton()
        set_icon(self.browse, "folder")
        self.browse.setToolTip("Choose the output folder")
        self.browse.clicked.connect(self.browse_requested)
        row.addWidget(self.browse)
        self.merge_button = set_icon(QPushButton("Merge"), "merge", "#ffffff")
        self.merge_button.setObjectName("Primary")
        self.merge_button.setToolTip("Run the merge (Ctrl+Return)")
        self.merge_button.clicked.connect(self.merge_requested)
        row.addWidget(self.merge_button)
        self.cancel_button = set_icon(QPushButton("Cancel"), "cancel")
        self.cancel_button.setToolTip("Stop the merge within one tensor; nothing is left at the output folder (Esc)")
        self.cancel_button.clicked.connect(self.cancel_requested)
        self.cancel_button.setEnabled(False)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)

        self.pages = _Pages()
        layout.addWidget(self.pages)

        idle = QLabel("Set the checkpoints and the method, watch the preview, then Merge.")
        idle.setObjectName("Muted")
        self.idle_label = idle
        self.pages.addWidget(idle)

        running = QWidget()
        rl = QVBoxLayout(running)
        rl.setContentsMargins(0, 0, 0, 0)
        self.progress = QProgressBar()
        self.progress.setObjectName("MergeProgress")
        self.progress.setRange(0, 1000)
        self.progress.setFormat("%p%")
        self.progress_label = QLabel("Starting…")
        self.progress_label.setObjectName("ProgressLabel")
        rl.addWidget(self.progress)
        rl.addWidget(self.progress_label)
        self.pages.addWidget(running)

        self.card = QFrame()
        self.card.setObjectName("SummaryCard")
        cl = QGridLayout(self.card)
        cl.setContentsMargins(12, 8, 12, 8)
        cl.setHorizontalSpacing(18)
        self.summary_title = QLabel()
        self.summary_title.setObjectName("SummaryTitle")
        self.summary_body = QLabel()
        self.summary_body.setWordWrap(True)
        self.summary_body.setTextFormat(Qt.TextFormat.RichText)
        self.summary_body.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.summary_extra = QLabel()
        self.summary_extra.setWordWrap(True)
        self.summary_extra.setTextFormat(Qt.TextFormat.RichText)
        buttons = QVBoxLayout()
        self.open_button = set_icon(QPushButton("Open folder"), "folder")
        self.open_button.setToolTip("Show the merged model in the file manager")
        self.export_button = set_icon(QPushButton("Export…"), "export")
        self.export_button.setToolTip("Write a copy with another dtype or shard size (Ctrl+E)")
        self.hub_button = set_icon(QPushButton("Export to Hub…"), "hub")
        self.open_button.clicked.connect(self.open_folder_requested)
        self.export_button.clicked.connect(self.export_requested)
        self.hub_button.clicked.connect(self.hub_requested)
        for b in (self.open_button, self.export_button, self.hub_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        cl.addWidget(self.summary_title, 0, 0, 1, 2)
        cl.addWidget(self.summary_body, 1, 0)
        cl.addWidget(self.summary_extra, 1, 1)
        cl.addLayout(buttons, 0, 2, 2, 1)
        cl.setColumnStretch(0, 3)
        cl.setColumnStretch(1, 2)
        self.pages.addWidget(self.card)
        self.result: Any = None

    # -- states ---------------------------------------------------------------------------------
    def set_running(self, running: bool) -> None:
        self.merge_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.output.setEnabled(not running)
        self.browse.setEnabled(not running)
        if running:
            self.progress.setRange(0, 0)  # busy until the first event says how much there is
            self.progress_label.setText("Opening the checkpoints…")
            self.pages.setCurrentIndex(self.PAGE_RUNNING)

    def show_progress(self, event: Any) -> None:
        if self.pages.currentIndex() != self.PAGE_RUNNING:
            self.pages.setCurrentIndex(self.PAGE_RUNNING)
        self.progress.setRange(0, 1000)
        self.progress.setValue(int(round(1000 * float(getattr(event, "fraction", 0.0)))))
        self.progress_label.setText(describe_progress(event))

    def show_idle(self, text: str | None = None, *, error: bool = False) -> None:
        self.idle_label.setObjectName("ErrorText" if error else "Muted")
        self.idle_label.style().unpolish(self.idle_label)
        self.idle_label.style().polish(self.idle_label)
        self.idle_label.setText(text or "Set the checkpoints and the method, watch the preview, then Merge.")
        self.pages.setCurrentIndex(self.PAGE_IDLE)

    def show_result(self, result: Any, labels: list[str]) -> None:
        """The executor's MergeResult: time, size, files; retention follows in `show_after`."""
        self.result = result
        self.summary_title.setText(f"Merged in {human_seconds(result.seconds)}")
        lines = [
            f"<b>Output</b>: {result.output}",
            f"<b>Size</b>: {human_bytes(result.output_bytes)} in {len([f for f in result.files if f.endswith('.safetensors')])} "
            f"safetensors file(s) · {result.tensors:,} tensors ({result.merged_tensors:,} merged)",
            f"<b>Read</b>: {human_bytes(result.input_bytes)} at {human_bytes(int(result.throughput_gbps * 1e9))}/s",
        ]
        if result.warnings:
            shown = "<br>".join(_esc(w) for w in result.warnings[:3])
            more = f" (+{len(result.warnings) - 3} more)" if len(result.warnings) > 3 else ""
            lines.append(f"<b>Warnings</b>: {shown}{more}")
        self.summary_body.setText("<br>".join(lines))
        self.summary_extra.setText("<i>Measuring retention…</i>")
        self.pages.setCurrentIndex(self.PAGE_DONE)

    def show_after(self, after: Any) -> None:
        parts = []
        if after.retention:
            values = " · ".join(f"{_esc(k)} <b>{v:.3f}</b>" for k, v in after.retention.items())
            parts.append(
                "<span title='cosine between the merged change and each model&#39;s task vector: 1 = fully kept'>"
                f"<b>Retention</b> cos(τ<sub>merged</sub>, τ<sub>i</sub>): {values}</span>"
            )
        elif after.retention_note:
            parts.append(f"<i>{_esc(after.retention_note)}</i>")
        if after.accuracy:
            merged, base = after.accuracy["merged"], after.accuracy.get("base")
            line = f"<b>Demo test accuracy</b>: mean task {merged['mean_task_accuracy']:.3f}"
            if base:
                line += f" (base {base['mean_task_accuracy']:.3f})"
            parts.append(line)
        self.summary_extra.setText("<br>".join(parts))

    def show_after_failed(self, message: str) -> None:
        self.summary_extra.setText(f"<i>Retention not measured: {_esc(message)}</i>")

    def set_hub_available(self, available: bool, reason: str = "") -> None:
        self.hub_button.setEnabled(available)
        self.hub_button.setToolTip("Push the merged model to the Hugging Face Hub" if available else reason)


class _Pages(QWidget):
    """Like QStackedWidget, but only the visible page counts for the height (the bar stays compact when idle)."""

    def __init__(self) -> None:
        super().__init__()
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._pages: list[QWidget] = []
        self._current = -1

    def addWidget(self, widget: QWidget) -> None:  # noqa: N802 - Qt naming
        self._layout.addWidget(widget)
        self._pages.append(widget)
        if self._current < 0:
            self._current = 0
        widget.setVisible(len(self._pages) - 1 == self._current)

    def setCurrentIndex(self, index: int) -> None:  # noqa: N802
        self._current = index
        for i, w in enumerate(self._pages):
            w.setVisible(i == index)

    def currentIndex(self) -> int:  # noqa: N802
        return self._current


def _esc(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def output_suggestion(base: Path | None, method: str, parent: Path) -> Path:
    """A fresh folder name such as `merged-ties` (then `merged-ties-2` ...) under `parent`."""
    stem = f"merged-{method}"
    candidate = parent / stem
    i = 2
    while candidate.exists():
        candidate = parent / f"{stem}-{i}"
        i += 1
    return candidate
