"""Help ▸ About: Alloy's version, and the version and licence of every library the app ships with.

Versions and licences are read from the installed distributions' metadata at
run time (the packaged app carries that metadata), so the dialog shows what is
really bundled rather than what someone once wrote down. A licence is taken
from the PEP 639 `License-Expression`, else a short `License` field, else the
trove classifiers; selecting a row shows the licence text the distribution
ships, where it ships one.
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass
from importlib import metadata

from PySide6.QtCore import Qt
from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

APP_DISTRIBUTION = "alloy-merge"

#: (shown name, distribution name) of what the app imports and the packaged build ships.
BUNDLED: tuple[tuple[str, str], ...] = (
    ("PySide6 (Qt for Python)", "PySide6_Essentials"),
    ("shiboken6", "shiboken6"),
    ("PyTorch", "torch"),
    ("Numba", "numba"),
    ("llvmlite", "llvmlite"),
    ("NumPy", "numpy"),
    ("SciPy", "scipy"),
    ("scikit-learn", "scikit-learn"),
    ("pyqtgraph", "pyqtgraph"),
    ("safetensors", "safetensors"),
    ("huggingface_hub", "huggingface_hub"),
    ("hf-xet", "hf-xet"),
    ("PyYAML", "PyYAML"),
    ("tqdm", "tqdm"),
)

NOT_INSTALLED = "not installed"
NOT_STATED = "not stated in its metadata"
_LICENCE_FILE = re.compile(r"^(licen[cs]e|copying|notice)", re.IGNORECASE)
_MAX_LICENCE_FIELD = 100  # a longer `License` field is the licence text itself, not its name


@dataclass(frozen=True)
class Component:
    """One row of the About table."""

    name: str
    version: str
    licence: str
    distribution: str | None = None  # None: not a Python distribution (the interpreter, Qt itself)


def licence_of(meta: metadata.PackageMetadata) -> str:
    """The licence a distribution declares, in the most precise form its metadata offers."""
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        return expression
    field = (meta.get("License") or "").strip()
    if field and "\n" not in field and len(field) <= _MAX_LICENCE_FIELD and field.upper() != "UNKNOWN":
        return field
    classifiers = [c.split("::")[-1].strip() for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    classifiers = [c for c in classifiers if c != "OSI Approved"]
    if classifiers:
        return " / ".join(dict.fromkeys(classifiers))
    return NOT_STATED


def distribution_component(name: str, distribution: str) -> Component:
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return Component(name, NOT_INSTALLED, "", distribution)
    return Component(name, dist.version, licence_of(dist.metadata), distribution)


def alloy_version() -> str:
    from merging import __version__

    return __version__


def alloy_licence() -> str:
    try:
        return licence_of(metadata.metadata(APP_DISTRIBUTION))
    except metadata.PackageNotFoundError:
        return NOT_STATED


def bundled_components() -> list[Component]:
    """Python, Qt and every bundled library, with versions and licences read now."""
    from PySide6.QtCore import qVersion

    rows = [
        # The interpreter is not a distribution, so it has no metadata to read; its licence is the PSF's.
        Component("Python", f"{platform.python_version()} ({platform.python_implementation()})", "PSF-2.0"),
    ]
    pyside = distribution_component("Qt", "PySide6_Essentials")  # the Qt libraries ship inside the PySide6 wheel
    rows.append(Component("Qt", qVersion(), pyside.licence, pyside.distribution))
    rows.extend(distribution_component(name, dist) for name, dist in BUNDLED)
    return rows


def licence_text(distribution: str | None) -> str:
    """The licence files a distribution ships (joined), or a line saying there are none."""
    if not distribution:
        return ""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return f"{distribution} is not installed."
    texts = []
    for f in dist.files or []:
        if not f.parts or not f.parts[0].endswith(".dist-info") or not _LICENCE_FILE.match(f.name):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            texts.append(f"── {'/'.join(f.parts[1:])} ──\n\n{text.strip()}\n")
    if texts:
        return "\n".join(texts)
    return f"{distribution} does not ship a licence file in its metadata; its declared licence is shown in the table."


class AboutDialog(QDialog):
    """Version, a one-line description, and the table of bundled libraries with their licences."""

    COLUMNS = ("Component", "Version", "Licence")

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("AboutDialog")
        self.setWindowTitle("About Alloy")
        self.resize(720, 560)
        self.components = bundled_components()
        layout = QVBoxLayout(self)

        self.title = QLabel(f"<h2>Alloy {alloy_version()}</h2>")
        self.title.setTextFormat(Qt.TextFormat.RichText)
        layout.addWidget(self.title)
        licence = alloy_licence()
        self.summary = QLabel(
            "Merge fine-tuned checkpoints: task arithmetic, TIES, DARE, Model Breadcrumbs, PCB and permutation "
            f"alignment.<br>Licence: {licence}.  Running on {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}{' (packaged app)' if getattr(sys, 'frozen', False) else ''}."
        )
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.RichText)
        layout.addWidget(self.summary)
        note = QLabel("Alloy ships with these libraries; select one to read its licence.")
        note.setObjectName("Muted")
        layout.addWidget(note)

        self.table = QTableWidget(len(self.components), len(self.COLUMNS))
        self.table.setObjectName("AboutComponents")
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        for row, comp in enumerate(self.components):
            for col, text in enumerate((comp.name, comp.version, comp.licence)):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                self.table.setItem(row, col, item)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)

        self.licence_view = QPlainTextEdit()
        self.licence_view.setObjectName("AboutLicenceText")
        self.licence_view.setReadOnly(True)
        self.licence_view.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.licence_view.setPlaceholderText("Select a library to show its licence text.")
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(self.licence_view)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        layout.addWidget(split, 1)
        self.table.itemSelectionChanged.connect(self._show_selected_licence)

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        buttons.accepted.connect(self.accept)
        layout.addWidget(buttons)

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def select(self, name: str) -> None:
        """Select a component's row (its licence text shows below the table)."""
        row = next(i for i, c in enumerate(self.components) if c.name == name)
        self.table.selectRow(row)

    def _show_selected_licence(self) -> None:
        rows = {i.row() for i in self.table.selectedItems()}
        if not rows:
            return
        comp = self.components[min(rows)]
        if comp.distribution is None:
            self.licence_view.setPlainText(f"{comp.name}: {comp.licence}")
            return
        self.licence_view.setPlainText(licence_text(comp.distribution))
        self.licence_view.moveCursor(self.licence_view.textCursor().MoveOperation.Start)


def show_about(parent: QWidget | None = None) -> AboutDialog:
    """Open the About dialog (non-blocking) and return it."""
    dialog = AboutDialog(parent)
    dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    dialog.open()
    return dialog
