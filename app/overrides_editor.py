"""Per-layer overrides as a table: one rule per row (regex and/or layer range), one column per parameter.

Each complete row becomes a `merging.recipe.Override`; a blank parameter cell
means "not overridden". Cells are checked with the method's own `Param.coerce`
as they are typed; a bad cell turns red with the reason as its tooltip.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from PySide6.QtCore import Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .param_widgets import format_value, param_tooltip
from .resources import set_icon
from .theme import current_colors

COL_MATCH, COL_LAYERS = 0, 1
_RANGE = re.compile(r"^\s*(\d+)\s*(?:(?:-|–|\.\.|to)\s*(\d+))?\s*$")


def parse_layers(text: str) -> tuple[int, int] | None:
    """'5' -> (5, 5); '2-7' / '2..7' -> (2, 7); '' -> None. ValueError explains a bad range."""
    text = (text or "").strip()
    if not text:
        return None
    m = _RANGE.match(text)
    if not m:
        raise ValueError("write a layer index (5) or an inclusive range (2-7)")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    if first > last:
        raise ValueError(f"first layer ({first}) is after the last ({last})")
    return first, last


def format_layers(layers: tuple[int, int] | None) -> str:
    if layers is None:
        return ""
    return str(layers[0]) if layers[0] == layers[1] else f"{layers[0]}-{layers[1]}"


def parse_cell(param: Any, text: str) -> Any:
    """A typed cell -> the parameter's value (YAML scalars: 0.3, true, global)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if param.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if param.kind is str and not isinstance(value, str):
        value = str(text).strip()
    return param.coerce(value)


class OverridesEditor(QWidget):
    changed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.params: list[Any] = []
        self._loading = False
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        intro = QLabel(
            "Rules for some tensors: a regular expression on the tensor name and/or a layer range. "
            "Later rules win; blank cells keep the method's value."
        )
        intro.setObjectName("Muted")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        self.table = QTableWidget(0, 2)
        self.table.setObjectName("OverridesTable")
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.itemChanged.connect(self._item_changed)
        self.table.setMinimumHeight(110)
        layout.addWidget(self.table, 1)
        buttons = QHBoxLayout()
        self.add_button = set_icon(QPushButton("Add rule"), "add")
        self.add_button.setToolTip("Add an override rule (then fill in a regex or layers and the values)")
        self.remove_button = set_icon(QPushButton("Remove"), "remove")
        self.remove_button.setToolTip("Remove the selected rules")
        self.add_button.clicked.connect(self.add_row)
        self.remove_button.clicked.connect(self.remove_selected)
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        buttons.addStretch(1)
        layout.addLayout(buttons)

    # -- structure ------------------------------------------------------------------------
    def set_params(self, params: list[Any]) -> None:
        """Columns for the method's shared (not per-model-only) parameters."""
        self.params = [p for p in params if p.name != "weight"]
        self._loading = True
        self.table.setColumnCount(2 + len(self.params))
        headers = ["Match (regex)", "Layers"] + [p.name for p in self.params]
        self.table.setHorizontalHeaderLabels(headers)
        tips = [
            "Regular expression searched in each tensor name, e.g. 'attn' or 'mlp\\.down_proj'. Blank: any tensor.",
            "Layer index or inclusive range, e.g. 4 or 0-11 (the first number in a tensor's name). Blank: any layer.",
        ] + [param_tooltip(p) for p in self.params]
        for col, tip in enumerate(tips):
            item = self.table.horizontalHeaderItem(col)
            if item is not None:
                item.setToolTip(tip)
        self.table.setColumnWidth(COL_MATCH, 150)
        self.table.setColumnWidth(COL_LAYERS, 70)
        for i in range(len(self.params)):
            self.table.setColumnWidth(2 + i, 80)
        self._loading = False

    def add_row(self) -> None:
        self._loading = True
        row = self.table.rowCount()
        self.table.insertRow(row)
        for col in range(self.table.columnCount()):
            self.table.setItem(row, col, QTableWidgetItem(""))
        self._loading = False
        self.table.setCurrentCell(row, COL_MATCH)
        self.table.editItem(self.table.item(row, COL_MATCH))

    def remove_selected(self) -> None:
        rows = sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True)
        for row in rows:
            self.table.removeRow(row)
        if rows:
            self.changed.emit()

    # -- data -------------------------------------------------------------------------------
    def set_overrides(self, overrides: list[Any]) -> None:
        self._loading = True
        self.table.setRowCount(0)
        for ov in overrides:
            row = self.table.rowCount()
            self.table.insertRow(row)
            self.table.setItem(row, COL_MATCH, QTableWidgetItem(ov.match or ""))
            self.table.setItem(row, COL_LAYERS, QTableWidgetItem(format_layers(ov.layers)))
            for i, p in enumerate(self.params):
                value = ov.parameters.get(p.name)
                if value is None:
                    value = next((ov.parameters[a] for a in p.aliases if a in ov.parameters), None)
                text = "" if value is None else format_value(value)
                self.table.setItem(row, 2 + i, QTableWidgetItem(text))
        self._loading = False
        self._validate_all()

    def overrides(self) -> list[Any]:
        """The complete, valid rows as engine `Override`s, in table order."""
        from merging.recipe import Override

        out = []
        for row in range(self.table.rowCount()):
            parsed = self._parse_row(row)
            if parsed is not None:
                match, layers, params = parsed
                out.append(Override(parameters=params, match=match, layers=layers))
        return out

    def _text(self, row: int, col: int) -> str:
        item = self.table.item(row, col)
        return item.text().strip() if item is not None else ""

    def _parse_row(self, row: int) -> tuple[str | None, tuple[int, int] | None, dict[str, Any]] | None:
        match = self._text(row, COL_MATCH) or None
        try:
            if match is not None:
                re.compile(match)
            layers = parse_layers(self._text(row, COL_LAYERS))
            params = {}
            for i, p in enumerate(self.params):
                text = self._text(row, 2 + i)
                if text:
                    params[p.name] = parse_cell(p, text)
        except (ValueError, re.error):
            return None
        if (match is None and layers is None) or not params:
            return None
        return match, layers, params

    def _cell_error(self, row: int, col: int) -> str | None:
        text = self._text(row, col)
        if col == COL_MATCH:
            if not text:
                return None
            try:
                re.compile(text)
            except re.error as exc:
                return f"bad regular expression: {exc}"
            return None
        if col == COL_LAYERS:
            try:
                parse_layers(text)
            except ValueError as exc:
                return str(exc)
            return None
        if not text:
            return None
        try:
            parse_cell(self.params[col - 2], text)
        except ValueError as exc:
            return str(exc)
        return None

    def _validate_all(self) -> None:
        for row in range(self.table.rowCount()):
            for col in range(self.table.columnCount()):
                self._mark(row, col)

    def _mark(self, row: int, col: int) -> None:
        item = self.table.item(row, col)
        if item is None:
            return
        error = self._cell_error(row, col)
        self._loading = True
        if error:
            item.setBackground(QBrush(QColor(current_colors().error_bg)))
            item.setToolTip(error)
        else:
            item.setBackground(QBrush())
            tip = self.table.horizontalHeaderItem(col).toolTip() if self.table.horizontalHeaderItem(col) else ""
            if self._parse_row(row) is None and error is None and any(self._text(row, c) for c in range(self.table.columnCount())):
                tip = "Incomplete rule: give a regex or layers, and at least one value."
            item.setToolTip(tip)
        self._loading = False

    def _item_changed(self, item: QTableWidgetItem) -> None:
        if self._loading:
            return
        for col in range(self.table.columnCount()):
            self._mark(item.row(), col)
        self.changed.emit()

    def has_errors(self) -> list[str]:
        problems = []
        for row in range(self.table.rowCount()):
            for col in range(self.table.columnCount()):
                error = self._cell_error(row, col)
                if error:
                    header = self.table.horizontalHeaderItem(col).text() if self.table.horizontalHeaderItem(col) else str(col)
                    problems.append(f"override rule {row + 1}, {header}: {error}")
        return problems

