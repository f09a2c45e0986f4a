"""The checkpoint table: one row per input model, roles and weights editable, drops accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt, Signal
from PySide6.QtGui import QColor, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QHeaderView,
    QStyledItemDelegate,
    QTableView,
    QWidget,
)

from .resources import icon
from .theme import current_colors
from .widgets import accept_file_drag, accept_file_drop
from .workspace import (
    ROLE_BASE,
    ROLES,
    STATUS_ERROR,
    STATUS_LOADING,
    ModelEntry,
    human_bytes,
    human_count,
    set_role,
)

COLUMNS = ("Name", "Format", "Parameters", "Dtype", "Architecture", "Size on disk", "Role", "Weight")
COL_NAME, COL_FORMAT, COL_PARAMS, COL_DTYPE, COL_ARCH, COL_SIZE, COL_ROLE, COL_WEIGHT = range(len(COLUMNS))

HEADER_TIPS = {
    COL_NAME: "File or folder name; hover for the full path.",
    COL_FORMAT: "How the weights are stored: safetensors, sharded folder, torch pickle (.bin/.pt) or a LoRA adapter.",
    COL_PARAMS: "Number of parameters (all tensors).",
    COL_DTYPE: "Storage dtype of the tensors (most common first).",
    COL_ARCH: "Architecture from config.json, when there is one.",
    COL_SIZE: "Bytes on disk.",
    COL_ROLE: "Base: the model the others were fine-tuned from; task vectors are measured from it.\n"
    "Fine-tuned: a model whose changes are merged. Double-click to change.",
    COL_WEIGHT: "This model's weight in the merge (the method's per-model 'weight'). Double-click to change.",
}


class CheckpointTableModel(QAbstractTableModel):
    """The rows are `workspace.ModelEntry` objects; edits go straight into them."""

    edited = Signal()  # a role or weight changed

    def __init__(self, parent=None):
        super().__init__(parent)
        self.entries: list[ModelEntry] = []
        self.weight_default: float | None = 1.0  # None: the method has no per-model weight
        self.weight_help = HEADER_TIPS[COL_WEIGHT]

    # -- structure ----------------------------------------------------------------------
    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.entries)

    def columnCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation != Qt.Orientation.Horizontal:
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.weight_help if section == COL_WEIGHT else HEADER_TIPS.get(section)
        return None

    def flags(self, index: QModelIndex | QPersistentModelIndex) -> Qt.ItemFlag:
        base = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
        if not index.isValid():
            return Qt.ItemFlag.ItemIsDropEnabled
        entry = self.entries[index.row()]
        if index.column() == COL_ROLE and entry.status != STATUS_LOADING:
            return base | Qt.ItemFlag.ItemIsEditable
        if index.column() == COL_WEIGHT and entry.role != ROLE_BASE and self.weight_default is not None:
            return base | Qt.ItemFlag.ItemIsEditable
        return base

    # -- data ---------------------------------------------------------------------------
    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        entry = self.entries[index.row()]
        col = index.column()
        spanned = entry.status in (STATUS_ERROR, STATUS_LOADING) and COL_FORMAT <= col < COL_ROLE
        if role == Qt.ItemDataRole.DisplayRole:
            if spanned:
                if col != COL_FORMAT:
                    return ""
                return "Reading headers…" if entry.status == STATUS_LOADING else entry.error
            return self._display(entry, col)
        if role == Qt.ItemDataRole.EditRole:
            if col == COL_ROLE:
                return entry.role
            if col == COL_WEIGHT:
                return entry.weight(self.weight_default or 1.0)
            return self._display(entry, col)
        if role == Qt.ItemDataRole.ToolTipRole:
            if col == COL_NAME:
                return str(entry.path) + (f"\n\n{entry.error}" if entry.error else "")
            if spanned and entry.error:
                return entry.error
            if col == COL_DTYPE and entry.dtypes:
                return "\n".join(f"{n}: {c} tensors" for n, c in entry.dtypes.items())
            if col == COL_PARAMS and entry.num_params is not None:
                return f"{entry.num_params:,} parameters"
            if col == COL_SIZE and entry.size_bytes is not None:
                return f"{entry.size_bytes:,} bytes"
            if col == COL_WEIGHT and entry.role == ROLE_BASE:
                return "The base has no weight: the merge adds the others' changes to it."
            if col in (COL_ROLE, COL_WEIGHT):
                return HEADER_TIPS[col]
            return None
        if role == Qt.ItemDataRole.DecorationRole and col == COL_NAME:
            if entry.status == STATUS_ERROR:
                return icon("error", "#d64545")
            return None
        if role == Qt.ItemDataRole.ForegroundRole:
            colors = current_colors()
            if entry.status == STATUS_ERROR and (col == COL_NAME or spanned):
                return QColor(colors.error)
            if entry.status == STATUS_LOADING and spanned:
                return QColor(colors.muted)
            if col == COL_WEIGHT and (entry.role == ROLE_BASE or self.weight_default is None):
                return QColor(colors.muted)
            return None
        if role == Qt.ItemDataRole.FontRole and col == COL_ROLE and entry.role == ROLE_BASE:
            from PySide6.QtGui import QFont

            font = QFont()
            font.setBold(True)
            return font
        if role == Qt.ItemDataRole.TextAlignmentRole and col in (COL_PARAMS, COL_SIZE, COL_WEIGHT):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def _display(self, entry: ModelEntry, col: int) -> str:
        if col == COL_NAME:
            return entry.name
        if col == COL_FORMAT:
            return entry.format
        if col == COL_PARAMS:
            return human_count(entry.num_params)
        if col == COL_DTYPE:
            return entry.dtype_label
        if col == COL_ARCH:
            return entry.architecture or "—"
        if col == COL_SIZE:
            return human_bytes(entry.size_bytes)
        if col == COL_ROLE:
            return entry.role
        if col == COL_WEIGHT:
            if entry.role == ROLE_BASE or self.weight_default is None:
                return "—"
            w = entry.parameters.get("weight", self.weight_default)
            return "curve" if isinstance(w, list) else f"{float(w):g}"
        return ""

    def setData(self, index: QModelIndex | QPersistentModelIndex, value: Any, role: int = Qt.ItemDataRole.EditRole) -> bool:
        if not index.isValid() or role != Qt.ItemDataRole.EditRole:
            return False
        row, col = index.row(), index.column()
        entry = self.entries[row]
        if col == COL_ROLE and value in ROLES:
            if value == entry.role:
                return False
            set_role(self.entries, row, value)
            self.dataChanged.emit(self.index(0, COL_ROLE), self.index(len(self.entries) - 1, COL_WEIGHT))
            self.edited.emit()
            return True
        if col == COL_WEIGHT and self.weight_default is not None:
            try:
                w = float(value)
            except (TypeError, ValueError):
                return False
            if entry.parameters.get("weight") == w or ("weight" not in entry.parameters and w == self.weight_default):
                return False
            entry.parameters["weight"] = w
            self.dataChanged.emit(index, index)
            self.edited.emit()
            return True
        return False

    # -- rows ---------------------------------------------------------------------------
    def set_entries(self, entries: list[ModelEntry]) -> None:
        self.beginResetModel()
        self.entries = list(entries)
        self.endResetModel()

    def add(self, entry: ModelEntry) -> int:
        row = len(self.entries)
        self.beginInsertRows(QModelIndex(), row, row)
        self.entries.append(entry)
        self.endInsertRows()
        return row

    def row_of(self, entry: ModelEntry) -> int:
        for i, e in enumerate(self.entries):
            if e is entry:
                return i
        return -1

    def replace(self, old: ModelEntry, new: ModelEntry) -> int:
        """Put an inspected entry where its placeholder was, keeping what the user set meanwhile."""
        row = self.row_of(old)
        if row < 0:
            return -1
        new.role, new.role_chosen = old.role, old.role_chosen
        new.parameters = old.parameters
        new.lora_base = old.lora_base
        self.entries[row] = new
        self.dataChanged.emit(self.index(row, 0), self.index(row, len(COLUMNS) - 1))
        return row

    def remove_rows(self, rows: list[int]) -> None:
        for row in sorted(set(rows), reverse=True):
            if 0 <= row < len(self.entries):
                self.beginRemoveRows(QModelIndex(), row, row)
                del self.entries[row]
                self.endRemoveRows()

    def contains_path(self, path: Path) -> bool:
        target = _key(path)
        return any(_key(e.path) == target for e in self.entries)

    def refresh(self) -> None:
        if self.entries:
            self.dataChanged.emit(self.index(0, 0), self.index(len(self.entries) - 1, len(COLUMNS) - 1))
        self.headerDataChanged.emit(Qt.Orientation.Horizontal, COL_WEIGHT, COL_WEIGHT)


def _key(path: Path) -> str:
    try:
        return str(Path(path).resolve())
    except OSError:
        return str(path)


class RoleDelegate(QStyledItemDelegate):
    def createEditor(self, parent: QWidget, option, index) -> QWidget:
        combo = QComboBox(parent)
        combo.addItems(list(ROLES))
        combo.setToolTip(HEADER_TIPS[COL_ROLE])
        combo.activated.connect(lambda _i, c=combo: self.commitData.emit(c))
        return combo

    def setEditorData(self, editor: QWidget, index) -> None:
        assert isinstance(editor, QComboBox)
        editor.setCurrentText(index.data(Qt.ItemDataRole.EditRole))

    def setModelData(self, editor: QWidget, model, index) -> None:
        assert isinstance(editor, QComboBox)
        model.setData(index, editor.currentText(), Qt.ItemDataRole.EditRole)


class WeightDelegate(QStyledItemDelegate):
    def createEditor(self, parent: QWidget, option, index) -> QWidget:
        spin = QDoubleSpinBox(parent)
        spin.setRange(-100.0, 100.0)
        spin.setDecimals(3)
        spin.setSingleStep(0.1)
        spin.setToolTip(index.model().headerData(COL_WEIGHT, Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole))
        return spin

    def setEditorData(self, editor: QWidget, index) -> None:
        assert isinstance(editor, QDoubleSpinBox)
        value = index.data(Qt.ItemDataRole.EditRole)
        editor.setValue(float(value) if isinstance(value, (int, float)) else 1.0)

    def setModelData(self, editor: QWidget, model, index) -> None:
        assert isinstance(editor, QDoubleSpinBox)
        model.setData(index, editor.value(), Qt.ItemDataRole.EditRole)


class CheckpointView(QTableView):
    """The table widget; drops of files and folders land here, Delete removes the selected rows."""

    paths_dropped = Signal(list)
    remove_requested = Signal(list)

    def __init__(self, model: CheckpointTableModel, parent: QWidget | None = None):
        super().__init__(parent)
        self.setModel(model)
        self.setAcceptDrops(True)
        self.viewport().setAcceptDrops(True)
        self.setDragDropMode(QAbstractItemView.DragDropMode.DropOnly)
        self.setDropIndicatorShown(False)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setEditTriggers(
            QAbstractItemView.EditTrigger.DoubleClicked
            | QAbstractItemView.EditTrigger.SelectedClicked
            | QAbstractItemView.EditTrigger.EditKeyPressed
        )
        self.setAlternatingRowColors(True)
        self.setWordWrap(False)
        self.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.verticalHeader().setVisible(False)
        self.verticalHeader().setDefaultSectionSize(28)
        header = self.horizontalHeader()
        header.setHighlightSections(False)
        header.setStretchLastSection(False)
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(COL_NAME, QHeaderView.ResizeMode.Stretch)
        widths = {COL_FORMAT: 150, COL_PARAMS: 95, COL_DTYPE: 110, COL_ARCH: 150, COL_SIZE: 105, COL_ROLE: 105, COL_WEIGHT: 80}
        for col, width in widths.items():
            self.setColumnWidth(col, width)
        self.setItemDelegateForColumn(COL_ROLE, RoleDelegate(self))
        self.setItemDelegateForColumn(COL_WEIGHT, WeightDelegate(self))
        self.setMinimumHeight(110)
        model.modelReset.connect(self.refresh_spans)
        model.rowsInserted.connect(self.refresh_spans)
        model.rowsRemoved.connect(self.refresh_spans)
        model.dataChanged.connect(self.refresh_spans)

    @property
    def table_model(self) -> CheckpointTableModel:
        model = self.model()
        assert isinstance(model, CheckpointTableModel)
        return model

    def refresh_spans(self, *args) -> None:
        """Loading and error rows show one message across the summary columns."""
        self.clearSpans()
        for row, entry in enumerate(self.table_model.entries):
            if entry.status in (STATUS_ERROR, STATUS_LOADING):
                self.setSpan(row, COL_FORMAT, 1, COL_ROLE - COL_FORMAT)

    def selected_rows(self) -> list[int]:
        return sorted({i.row() for i in self.selectionModel().selectedRows()})

    # -- drag and drop ------------------------------------------------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        accept_file_drag(event)

    def dragMoveEvent(self, event) -> None:
        accept_file_drag(event)

    def dropEvent(self, event: QDropEvent) -> None:
        paths = accept_file_drop(event)
        if paths:
            self.paths_dropped.emit(paths)

    def keyPressEvent(self, event) -> None:
        if event.matches(QKeySequence.StandardKey.Delete) or event.key() == Qt.Key.Key_Backspace:
            rows = self.selected_rows()
            if rows:
                self.remove_requested.emit(rows)
                return
        super().keyPressEvent(event)
