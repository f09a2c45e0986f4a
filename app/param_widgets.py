"""One editor per method parameter, built from the method's `Param` (kind, default, bounds, help).

Nothing about any particular method is written here: a new method in the
engine's registry gets its widgets, defaults and tooltips automatically.
"""

from __future__ import annotations

import math
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSlider,
    QSpinBox,
    QToolButton,
    QWidget,
)

from .resources import set_icon

SLIDER_STEPS = 1000
WIDE = 1e6


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def param_tooltip(param: Any) -> str:
    """Rich tooltip: the method's help text, the default and the allowed range or choices."""
    lines = [f"<b>{param.name}</b>"]
    if param.help:
        lines.append(param.help)
    lines.append(f"Default: <b>{format_value(param.default)}</b>")
    if param.choices:
        lines.append("Choices: " + ", ".join(param.choices))
    elif param.minimum is not None or param.maximum is not None:
        lo = "−∞" if param.minimum is None else format_value(param.minimum)
        hi = "∞" if param.maximum is None else format_value(param.maximum)
        lines.append(f"Range: {lo} … {hi}")
    if param.per_model:
        lines.append("<i>Can also be set per model in the recipe.</i>")
    if getattr(param, "aliases", ()):
        lines.append("Also read as: " + ", ".join(param.aliases))
    return "<br>".join(lines)


def _decimals(param: Any) -> int:
    span = None
    if param.minimum is not None and param.maximum is not None:
        span = float(param.maximum) - float(param.minimum)
    if span is not None and span <= 1.0:
        return 4
    return 3


class ParamEditor(QObject):
    """Editor for one parameter: the input widget, a 'default: x' hint and a reset button."""

    changed = Signal(str, object)  # name, new value (None: back to the default)

    def __init__(self, param: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.param = param
        self.widget = QWidget(parent)
        self._updating = False
        self._is_curve = False
        layout = QHBoxLayout(self.widget)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(6)
        tip = param_tooltip(param)
        self.slider: QSlider | None = None
        kind = param.kind
        if kind is bool:
            self.editor: QWidget = QCheckBox()
            self.editor.toggled.connect(self._edited)
        elif kind is str and param.choices:
            self.editor = QComboBox()
            self.editor.addItems(list(param.choices))
            self.editor.currentTextChanged.connect(self._edited)
        elif kind is str:
            self.editor = QLineEdit()
            self.editor.editingFinished.connect(self._edited)
        elif kind is int:
            self.editor = QSpinBox()
            lo = int(param.minimum) if param.minimum is not None else -(2**31 - 1)
            hi = int(param.maximum) if param.maximum is not None else 2**31 - 1
            self.editor.setRange(lo, hi)
            self.editor.setKeyboardTracking(False)
            self.editor.valueChanged.connect(self._edited)
        else:
            self.editor = QDoubleSpinBox()
            lo = float(param.minimum) if param.minimum is not None else -WIDE
            hi = float(param.maximum) if param.maximum is not None else WIDE
            self.editor.setRange(lo, hi)
            self.editor.setDecimals(_decimals(param))
            self.editor.setSingleStep(0.01 if (hi - lo) <= 1.0 else 0.05)
            self.editor.setKeyboardTracking(False)
            self.editor.valueChanged.connect(self._edited)
            if param.minimum is not None and param.maximum is not None and math.isfinite(hi - lo) and hi > lo:
                self.slider = QSlider(Qt.Orientation.Horizontal)
                self.slider.setRange(0, SLIDER_STEPS)
                self.slider.setToolTip(tip)
                self.slider.valueChanged.connect(self._slid)
                self.slider.setMinimumWidth(90)
        self.editor.setToolTip(tip)
        self.editor.setObjectName(f"param_{param.name}")
        if self.slider is not None:
            layout.addWidget(self.slider, 1)
            self.editor.setFixedWidth(86)
            layout.addWidget(self.editor, 0)
        else:
            layout.addWidget(self.editor, 1)
        self.curve_label = QLabel("varies across layers — see Layer curve")
        self.curve_label.setObjectName("Muted")
        self.curve_label.hide()
        layout.addWidget(self.curve_label, 1)
        self.hint = QLabel(f"default {format_value(param.default)}")
        self.hint.setObjectName("DefaultHint")
        self.hint.setToolTip(tip)
        layout.addWidget(self.hint, 0)
        self.reset = QToolButton()
        set_icon(self.reset, "reset")
        self.reset.setAutoRaise(True)
        self.reset.setToolTip(f"Back to the default ({format_value(param.default)})")
        self.reset.clicked.connect(self._reset)
        layout.addWidget(self.reset, 0)
        self.set_value(None)

    # -- value ----------------------------------------------------------------------------
    def value(self) -> Any:
        e = self.editor
        if isinstance(e, QCheckBox):
            return e.isChecked()
        if isinstance(e, QComboBox):
            return e.currentText()
        if isinstance(e, QLineEdit):
            return e.text()
        if isinstance(e, QSpinBox):
            return int(e.value())
        assert isinstance(e, QDoubleSpinBox)
        return float(round(e.value(), e.decimals()))

    def set_value(self, value: Any) -> None:
        """Show `value` (None: the default; a list: a per-layer curve or conditional value)."""
        self._updating = True
        try:
            self._is_curve = isinstance(value, list)
            shown = self.param.default if value is None or self._is_curve else value
            e = self.editor
            if isinstance(e, QCheckBox):
                e.setChecked(bool(shown))
            elif isinstance(e, QComboBox):
                e.setCurrentText(str(shown))
            elif isinstance(e, QLineEdit):
                e.setText("" if shown is None else str(shown))
            elif isinstance(e, QSpinBox):
                e.setValue(int(shown))
            else:
                e.setValue(float(shown))
            self._sync_slider()
            for w in (self.editor, self.slider):
                if w is not None:
                    w.setVisible(not self._is_curve)
            self.curve_label.setVisible(self._is_curve)
            self.reset.setVisible(value is not None)
        finally:
            self._updating = False

    def _sync_slider(self) -> None:
        if self.slider is None:
            return
        lo, hi = float(self.param.minimum), float(self.param.maximum)
        v = float(self.editor.value())  # type: ignore[attr-defined]
        self.slider.blockSignals(True)
        self.slider.setValue(int(round((v - lo) / (hi - lo) * SLIDER_STEPS)))
        self.slider.blockSignals(False)

    def _slid(self, position: int) -> None:
        lo, hi = float(self.param.minimum), float(self.param.maximum)
        value = lo + (hi - lo) * position / SLIDER_STEPS
        self.editor.setValue(value)  # type: ignore[attr-defined]  # emits valueChanged -> _edited

    def _edited(self, *args) -> None:
        if self._updating:
            return
        self._sync_slider()
        value = self.value()
        self.reset.setVisible(True)
        self.changed.emit(self.param.name, value)

    def _reset(self) -> None:
        self.set_value(None)
        self.changed.emit(self.param.name, None)
