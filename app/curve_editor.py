"""A parameter as a curve across layers: mergekit's gradient list, edited by dragging anchor points.

The recipe stores `parameters: {density: [0.1, 0.3, 0.5]}`; the engine spreads
the anchors evenly over the model's depth and interpolates linearly between
them. The plot shows the anchors (draggable) and the value each numbered layer
gets, so the user sees what the merge will use.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .param_widgets import format_value, param_tooltip
from .theme import current_colors

MAX_ANCHORS = 9


class DraggableAnchors(pg.GraphItem):
    """Anchor points that move vertically under the mouse; `moved(index, value)` while dragging."""

    moved = Signal(int, float)

    def __init__(self) -> None:
        super().__init__()
        self._drag_index: int | None = None
        self._drag_offset = 0.0
        self.bounds: tuple[float | None, float | None] = (None, None)
        self.pos_array = np.zeros((0, 2))

    def set_points(self, xs: np.ndarray, ys: np.ndarray, brush: str) -> None:
        self.pos_array = np.column_stack([xs, ys]).astype(float)
        n = len(xs)
        adj = np.array([[i, i + 1] for i in range(n - 1)], dtype=int) if n > 1 else np.zeros((0, 2), dtype=int)
        self.setData(pos=self.pos_array, adj=adj, size=13, symbol="o", symbolBrush=brush, pxMode=True,
                     pen=pg.mkPen(brush, width=1, style=Qt.PenStyle.DashLine), data=np.arange(n))

    def mouseDragEvent(self, ev) -> None:
        if ev.button() != Qt.MouseButton.LeftButton:
            ev.ignore()
            return
        if ev.isStart():
            hits = self.scatter.pointsAt(ev.buttonDownPos())
            if len(hits) == 0:
                ev.ignore()
                return
            self._drag_index = int(hits[0].data())
            self._drag_offset = self.pos_array[self._drag_index][1] - ev.buttonDownPos()[1]
        elif ev.isFinish():
            self._drag_index = None
            return
        elif self._drag_index is None:
            ev.ignore()
            return
        y = float(ev.pos()[1] + self._drag_offset)
        lo, hi = self.bounds
        if lo is not None:
            y = max(lo, y)
        if hi is not None:
            y = min(hi, y)
        self.moved.emit(self._drag_index, y)
        ev.accept()


class CurveEditor(QWidget):
    """Pick a numeric parameter, switch on 'vary across layers', shape the curve."""

    changed = Signal(str, object)  # parameter name, list of anchors (None: back to one value)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.params: list[Any] = []
        self.values: dict[str, Any] = {}
        self.layer_count = 12
        self._loading = False
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        top = QHBoxLayout()
        top.addWidget(QLabel("Parameter"))
        self.param_combo = QComboBox()
        self.param_combo.setToolTip("The parameter to vary across the model's layers")
        self.param_combo.currentIndexChanged.connect(self._param_chosen)
        top.addWidget(self.param_combo, 1)
        self.enable = QCheckBox("Vary across layers")
        self.enable.setToolTip(
            "Give this parameter a list of values spread evenly from the first to the last layer "
            "(mergekit's gradient syntax); tensors between anchors get interpolated values."
        )
        self.enable.toggled.connect(self._enable_toggled)
        top.addWidget(self.enable)
        top.addWidget(QLabel("Anchors"))
        self.count = QSpinBox()
        self.count.setRange(2, MAX_ANCHORS)
        self.count.setValue(3)
        self.count.setToolTip("How many evenly spaced values define the curve")
        self.count.valueChanged.connect(self._count_changed)
        top.addWidget(self.count)
        layout.addLayout(top)

        self.plot = pg.PlotWidget()
        self.plot.setObjectName("CurvePlot")
        self.plot.setMinimumHeight(150)
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setLabel("bottom", "layer (in depth order)")
        self.plot.setLabel("left", "value")
        self.plot.setTitle("Value per layer (drag the points)")
        self.line = self.plot.plot([], [], pen=pg.mkPen(current_colors().accent, width=2), symbol="s", symbolSize=5,
                                   name="value per layer")
        self.anchors = DraggableAnchors()
        self.anchors.moved.connect(self._dragged)
        self.plot.addItem(self.anchors)
        layout.addWidget(self.plot, 1)

        self.spin_row = QGridLayout()
        self.spins: list[QDoubleSpinBox] = []
        layout.addLayout(self.spin_row)
        self._set_enabled_look(False)

    # -- setup -------------------------------------------------------------------------------
    def set_params(self, params: list[Any], values: dict[str, Any]) -> None:
        """Numeric parameters of the method; `values` is the recipe's top-level `parameters`."""
        self._loading = True
        self.params = [p for p in params if p.kind in (int, float) and p.name != "weight"]
        self.values = values
        current = self.param_combo.currentText()
        self.param_combo.clear()
        for p in self.params:
            self.param_combo.addItem(p.name)
            self.param_combo.setItemData(self.param_combo.count() - 1, param_tooltip(p), Qt.ItemDataRole.ToolTipRole)
        # prefer a parameter that already varies, then the previous choice
        varying = [p.name for p in self.params if isinstance(values.get(p.name), list) and _numeric_list(values[p.name])]
        choice = varying[0] if varying else current
        idx = self.param_combo.findText(choice)
        self.param_combo.setCurrentIndex(idx if idx >= 0 else 0)
        self._loading = False
        self.setEnabled(bool(self.params))
        self._param_chosen()

    def set_layer_count(self, count: int | None) -> None:
        self.layer_count = max(2, int(count or 12))
        self._redraw()

    @property
    def param(self) -> Any | None:
        i = self.param_combo.currentIndex()
        return self.params[i] if 0 <= i < len(self.params) else None

    def anchor_values(self) -> list[float]:
        return [float(s.value()) for s in self.spins]

    # -- events -------------------------------------------------------------------------------
    def _param_chosen(self, *args) -> None:
        if self._loading:
            return
        p = self.param
        if p is None:
            self._rebuild_spins([])
            return
        value = self.values.get(p.name)
        self._loading = True
        if isinstance(value, list) and _numeric_list(value):
            self.enable.setChecked(True)
            self.count.setValue(max(2, min(MAX_ANCHORS, len(value))))
            anchors = [float(v) for v in value]
        else:
            self.enable.setChecked(False)
            scalar = value if isinstance(value, (int, float)) and not isinstance(value, bool) else p.default
            anchors = [float(scalar)] * self.count.value()
        self._loading = False
        self._rebuild_spins(anchors)
        self._set_enabled_look(self.enable.isChecked())

    def _rebuild_spins(self, anchors: list[float]) -> None:
        while self.spin_row.count():
            w = self.spin_row.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        self.spins = []
        p = self.param
        for i, v in enumerate(anchors):
            spin = QDoubleSpinBox()
            lo = float(p.minimum) if p is not None and p.minimum is not None else -1e6
            hi = float(p.maximum) if p is not None and p.maximum is not None else 1e6
            spin.setRange(lo, hi)
            spin.setDecimals(3)
            spin.setSingleStep(0.05)
            spin.setKeyboardTracking(False)
            spin.setValue(v)
            spin.setToolTip(f"Anchor {i + 1} of {len(anchors)} (at {i / max(1, len(anchors) - 1):.0%} of the depth)")
            spin.valueChanged.connect(self._spin_changed)
            self.spin_row.addWidget(spin, 0, i)
            self.spins.append(spin)
        self._redraw()

    def _count_changed(self, n: int) -> None:
        if self._loading:
            return
        old = self.anchor_values() or [float(self.param.default if self.param else 0.0)]
        xs_old = np.linspace(0, 1, len(old)) if len(old) > 1 else np.array([0.0, 1.0])
        ys_old = np.array(old if len(old) > 1 else old * 2)
        anchors = [float(v) for v in np.interp(np.linspace(0, 1, n), xs_old, ys_old)]
        self._rebuild_spins(anchors)
        self._emit()

    def _enable_toggled(self, on: bool) -> None:
        self._set_enabled_look(on)
        if not self._loading:
            self._emit()

    def _spin_changed(self, *args) -> None:
        self._redraw()
        if not self._loading:
            self._emit()

    def _dragged(self, index: int, value: float) -> None:
        if 0 <= index < len(self.spins):
            if not self.enable.isChecked():
                self.enable.setChecked(True)
            self.spins[index].setValue(value)

    def _emit(self) -> None:
        p = self.param
        if p is None:
            return
        if self.enable.isChecked():
            anchors = [p.kind(v) if p.kind is int else round(v, 6) for v in self.anchor_values()]
            self.values[p.name] = anchors
            self.changed.emit(p.name, anchors)
        else:
            if isinstance(self.values.get(p.name), list):
                self.values.pop(p.name, None)
                self.changed.emit(p.name, None)

    # -- drawing ---------------------------------------------------------------------------------
    def _set_enabled_look(self, on: bool) -> None:
        for s in self.spins:
            s.setEnabled(on)
        self.count.setEnabled(on)
        self.plot.setEnabled(True)
        self._redraw()

    def _redraw(self) -> None:
        anchors = self.anchor_values()
        colors = current_colors()
        self.plot.setBackground(colors.plot_background)
        for side in ("left", "bottom"):
            axis = self.plot.getAxis(side)
            axis.setPen(pg.mkPen(colors.plot_foreground))
            axis.setTextPen(pg.mkPen(colors.plot_foreground))
        if not anchors:
            self.line.setData([], [])
            self.anchors.set_points(np.zeros(0), np.zeros(0), colors.accent)
            return
        last = self.layer_count - 1
        xs = np.linspace(0, last, len(anchors))
        layers = np.arange(self.layer_count)
        values = np.interp(layers / last if last else layers, np.linspace(0, 1, len(anchors)), anchors)
        self.line.setData(layers, values)
        self.line.setPen(pg.mkPen(colors.accent if self.enable.isChecked() else colors.muted, width=2))
        self.anchors.set_points(xs, np.array(anchors), "#e0662a" if self.enable.isChecked() else colors.muted)
        p = self.param
        self.anchors.bounds = (
            None if p is None or p.minimum is None else float(p.minimum),
            None if p is None or p.maximum is None else float(p.maximum),
        )
        name = p.name if p is not None else "value"
        self.plot.setLabel("left", name, color=colors.plot_foreground)
        self.plot.setLabel("bottom", "layer (in depth order)", color=colors.plot_foreground)
        self.plot.setTitle(
            f"{name} per layer — drag the points" if self.enable.isChecked()
            else f"{name} = {format_value(anchors[0])} everywhere (tick 'Vary across layers')",
            color=colors.plot_foreground,
        )
        lo = min(anchors + ([float(p.minimum)] if p is not None and p.minimum is not None else []))
        hi = max(anchors + ([float(p.maximum)] if p is not None and p.maximum is not None else []))
        pad = (hi - lo) * 0.08 or 0.1
        self.plot.setYRange(lo - pad, hi + pad, padding=0)
        self.plot.setXRange(-0.3, last + 0.3, padding=0)
        step = max(1, math.ceil(self.layer_count / 12))
        self.plot.getAxis("bottom").setTicks([[(float(i), str(i)) for i in range(0, self.layer_count, step)]])


def _numeric_list(value: list) -> bool:
    return bool(value) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
