"""Export to a folder and Export to the Hub: each a dialog with its own worker, progress and Cancel."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QAction, QDesktopServices
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .resources import set_icon
from .workers import Job
from .workspace import human_bytes

KEEP_DTYPE = "keep (as merged)"


class _JobDialog(QDialog):
    """Shared frame: a form, a progress bar, a message line, Start / Cancel / Close."""

    def __init__(self, title: str, start_text: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle(title)
        self.setMinimumWidth(560)
        self.job: Job | None = None
        layout = QVBoxLayout(self)
        self.form = QFormLayout()
        self.form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        layout.addLayout(self.form)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.hide()
        layout.addWidget(self.progress)
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setTextFormat(Qt.TextFormat.RichText)
        self.message.setOpenExternalLinks(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        layout.addWidget(self.message)
        self.buttons = QDialogButtonBox()
        self.start_button = self.buttons.addButton(start_text, QDialogButtonBox.ButtonRole.AcceptRole)
        self.start_button.setObjectName("Primary")
        self.cancel_button = self.buttons.addButton("Cancel", QDialogButtonBox.ButtonRole.RejectRole)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel_or_close)
        layout.addWidget(self.buttons)

    def set_message(self, text: str, kind: str = "info") -> None:
        from .theme import current_colors

        colors = current_colors()
        color = {"error": colors.error, "ok": colors.ok}.get(kind)
        self.message.setText(f"<span style='color:{color}'>{text}</span>" if color else text)

    def run_job(self, fn: Callable, on_success: Callable[[Any], None]) -> Job:
        self.progress.setRange(0, 0)
        self.progress.show()
        self.start_button.setEnabled(False)
        self.cancel_button.setText("Cancel")
        self.set_form_enabled(False)
        job = Job(fn, name=self.windowTitle())
        job.progress.connect(self.on_progress)
        job.succeeded.connect(on_success)
        job.failed.connect(lambda msg: self.set_message(_esc(msg), "error"))
        job.cancelled.connect(lambda: self.set_message("Cancelled; nothing was written."))
        job.finished.connect(self._job_finished)
        self.job = job
        job.start()
        return job

    def _job_finished(self) -> None:
        self.progress.hide()
        self.start_button.setEnabled(True)
        self.cancel_button.setText("Close")
        self.set_form_enabled(True)

    def on_progress(self, event: Any) -> None:
        self.progress.setRange(0, 1000)
        self.progress.setValue(int(1000 * float(getattr(event, "fraction", 0.0))))

    def set_form_enabled(self, enabled: bool) -> None:
        for i in range(self.form.rowCount()):
            item = self.form.itemAt(i, QFormLayout.ItemRole.FieldRole)
            if item is not None and item.widget() is not None:
                item.widget().setEnabled(enabled)
            elif item is not None and item.layout() is not None:
                lay = item.layout()
                for j in range(lay.count()):
                    w = lay.itemAt(j).widget()
                    if w is not None:
                        w.setEnabled(enabled)

    def cancel_or_close(self) -> None:
        if self.job is not None and self.job.running:
            self.job.cancel()
            self.set_message("Cancelling…")
        else:
            self.reject()

    def closeEvent(self, event) -> None:
        if self.job is not None and self.job.running:
            self.job.cancel()
            self.job.wait(10)
        super().closeEvent(event)

    def start(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class ExportDialog(_JobDialog):
    """Write the merged model again, to another folder, with another dtype or shard size."""

    exported = Signal(object)

    def __init__(self, source: Path, *, folder: str, shard: str = "5GB", parent: QWidget | None = None):
        super().__init__("Export merged model", "Export", parent)
        self.source = Path(source)
        src = QLabel(str(self.source))
        src.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.form.addRow("From", src)
        row = QHBoxLayout()
        self.target = QLineEdit(str(Path(folder) / f"{self.source.name}-export"))
        self.target.setToolTip("A new folder; it appears only when the export is complete.")
        browse = QToolButton()
        set_icon(browse, "folder")
        browse.setToolTip("Choose the folder")
        browse.clicked.connect(self._browse)
        row.addWidget(self.target, 1)
        row.addWidget(browse)
        self.form.addRow("To folder", row)
        self.dtype = QComboBox()
        self.dtype.addItems([KEEP_DTYPE, "float32", "bfloat16", "float16"])
        self.dtype.setToolTip("Dtype of the floating-point tensors in the copy; integer buffers keep theirs.")
        self.form.addRow("Output dtype", self.dtype)
        self.shard = QLineEdit(shard)
        self.shard.setToolTip("Largest safetensors file (5GB, 500MB, 2GiB); bigger models are sharded with an index.")
        self.form.addRow("Shard size", self.shard)
        self.overwrite = QCheckBox("Replace the folder if it exists")
        self.overwrite.setToolTip("The old folder is swapped out only after the new copy is complete.")
        self.form.addRow("", self.overwrite)
        self.result: Path | None = None

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Export to folder", str(Path(self.target.text()).parent))
        if path:
            self.target.setText(str(Path(path) / f"{self.source.name}-export"))

    def start(self) -> None:
        from merging.export import parse_size

        from .jobs import export_job

        target = self.target.text().strip()
        if not target:
            self.set_message("Choose a folder to export to.", "error")
            return
        try:
            shard = parse_size(self.shard.text().strip())
        except ValueError as exc:
            self.set_message(f"Shard size: {_esc(str(exc))}", "error")
            return
        dtype = None if self.dtype.currentText() == KEEP_DTYPE else self.dtype.currentText()
        self.set_message("Exporting…")
        self.run_job(export_job(self.source, Path(target), dtype=dtype, shard_size=shard, overwrite=self.overwrite.isChecked()),
                     self._done)

    def _done(self, path: Path) -> None:
        self.result = Path(path)
        url = QUrl.fromLocalFile(str(path)).toString()
        self.set_message(f"Exported to <a href='{url}'>{_esc(str(path))}</a>.", "ok")
        self.exported.emit(self.result)


class HubDialog(_JobDialog):
    """Push the merged folder to a Hugging Face model repo (merging.hub)."""

    pushed = Signal(object)

    def __init__(self, folder: Path, *, license: str | None = None, default_repo: str = "", parent: QWidget | None = None):
        super().__init__("Export to the Hugging Face Hub", "Push", parent)
        from merging import hub

        self.hub = hub
        self.folder = Path(folder)
        src = QLabel(str(self.folder))
        src.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.form.addRow("Folder", src)
        self.repo = QLineEdit(default_repo)
        self.repo.setPlaceholderText("your-name/merged-model")
        self.repo.setToolTip("The model repo to push to: namespace/name. It is created when it does not exist.")
        self.repo.textChanged.connect(self._check_repo)
        self.form.addRow("Repo id", self.repo)
        self.repo_error = QLabel()
        self.repo_error.setObjectName("ErrorText")
        self.repo_error.setWordWrap(True)
        self.form.addRow("", self.repo_error)
        self.private = QCheckBox("Private repo")
        self.private.setToolTip("Create the repo as private (an existing public repo is refused).")
        self.form.addRow("", self.private)
        row = QHBoxLayout()
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText(self._token_hint())
        self.token.setToolTip("A Hugging Face access token with write access. Blank: HF_TOKEN, or the login saved by "
                              "`hf auth login`. The token is never shown, logged or saved by Alloy.")
        self.show_token = QAction("Show", self.token)
        self.show_token.setCheckable(True)
        self.show_token.setToolTip("Show or hide the token while typing")
        self.show_token.toggled.connect(
            lambda on: self.token.setEchoMode(QLineEdit.EchoMode.Normal if on else QLineEdit.EchoMode.Password)
        )
        show_button = QToolButton()
        show_button.setDefaultAction(self.show_token)
        row.addWidget(self.token, 1)
        row.addWidget(show_button)
        self.form.addRow("Token", row)
        self.license = QLineEdit(license or "")
        self.license.setPlaceholderText("e.g. apache-2.0 (written into the model card)")
        self.license.setToolTip("License in the model card's front matter; changing it rewrites README.md before the push.")
        self.form.addRow("License", self.license)
        self.result: Any = None
        self._check_repo()

    def _token_hint(self) -> str:
        if self.hub.env_token():
            return "blank: use HF_TOKEN from the environment"
        try:
            saved = self.hub.resolve_token(None)
        except Exception:  # noqa: BLE001 - a broken token store only changes the hint
            saved = None
        return "blank: use the saved Hugging Face login" if saved else "paste a write token (hf_…)"

    def _check_repo(self, *args) -> bool:
        problem = self.hub.validate_repo_id(self.repo.text())
        self.repo_error.setText("" if problem is None or not self.repo.text() else problem)
        self.start_button.setEnabled(problem is None)
        return problem is None

    def start(self) -> None:
        if not self._check_repo():
            return
        repo = self.repo.text().strip()
        token = self.token.text().strip() or None
        private = self.private.isChecked()
        license = self.license.text().strip() or None
        folder = self.folder
        hub = self.hub

        def run(progress, cancel):
            if license is not None:
                _rewrite_card(folder, license)
            return hub.push_folder(
                folder, repo, token=token, private=private,
                progress=lambda done, total: progress(_Bytes(done, total)), cancel=cancel,
            )

        self.set_message(f"Pushing to {_esc(repo)}…")
        self.run_job(run, self._done)

    def on_progress(self, event: Any) -> None:
        super().on_progress(event)
        if isinstance(event, _Bytes) and event.total:
            self.set_message(f"Uploading · {human_bytes(event.done)} of {human_bytes(event.total)}")

    def _done(self, result: Any) -> None:
        self.result = result
        self.token.clear()
        self.set_message(f"Pushed: <a href='{result.repo_url}'>{_esc(result.repo_url)}</a>", "ok")
        self.pushed.emit(result)


class _Bytes:
    """Progress of an upload: bytes of files finished."""

    def __init__(self, done: int, total: int):
        self.done, self.total = int(done), int(total)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


def _rewrite_card(folder: Path, license: str) -> None:
    """Write the model card again with the chosen license (the recipe beside it is the source)."""
    from merging.export import RECIPE_FILE, write_recipe_files
    from merging.recipe import load_recipe

    recipe_file = folder / RECIPE_FILE
    if not recipe_file.is_file():
        return
    import json

    cfg = None
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    write_recipe_files(folder, load_recipe(recipe_file), license=license, checkpoint_config=cfg)


def open_folder(path: Path) -> bool:
    return QDesktopServices.openUrl(QUrl.fromLocalFile(str(path)))


def _esc(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["ExportDialog", "HubDialog", "open_folder"]
