"""One preview tab: one or two figures, side by side when there is room, else one at a time with a switch.

A figure is a pyqtgraph PlotItem from `app.plots`. Its legend is moved under
the plot, where it hides no data. Below about 520 px per figure the tab shows
one figure and a row of buttons to pick it, so nothing is squeezed or cut off
at 1280×800.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QButtonGroup, QHBoxLayout, QToolButton, QVBoxLayout, QWidget

MIN_FIGURE_WIDTH = 520


class FigureTab(QWidget):
    def __init__(self, name: str, parent: QWidget | None = None):
        super().__init__(parent)
        import pyqtgraph as pg

        self.setObjectName(name)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 4, 0, 0)
        layout.setSpacing(2)
        self.switch_bar = QWidget()
        self.switch_layout = QHBoxLayout(self.switch_bar)
        self.switch_layout.setContentsMargins(6, 0, 6, 0)
        self.switch_group = QButtonGroup(self)
        self.switch_group.setExclusive(True)
        self.switch_group.idClicked.connect(self._picked)
        layout.addWidget(self.switch_bar)
        self.canvas = pg.GraphicsLayoutWidget()
        layout.addWidget(self.canvas, 1)
        self.figures: list[tuple[str, str, Any]] = []  # (name, switch label, PlotItem)
        self.style: Any = None
        self.message_text: str | None = None
        self.selected = 0
        self.side_by_side: bool | None = None
        self._relayout = QTimer(self)
        self._relayout.setSingleShot(True)
        self._relayout.setInterval(80)
        self._relayout.timeout.connect(self._maybe_rearrange)
        self.switch_bar.hide()

    @property
    def items(self) -> dict[str, Any]:
        return {name: item for name, _label, item in self.figures}

    def set_figures(self, figures: list[tuple[str, str, Any]], style: Any) -> None:
        self.figures = figures
        self.style = style
        self.message_text = None
        self.selected = min(self.selected, max(0, len(figures) - 1))
        self._rebuild_switch()
        self.arrange()

    def show_message(self, text: str, style: Any) -> None:
        self.figures = []
        self.style = style
        self.message_text = text
        self._rebuild_switch()
        self.arrange()

    def _wants_side_by_side(self) -> bool:
        return len(self.figures) > 1 and self.width() >= MIN_FIGURE_WIDTH * len(self.figures)

    def arrange(self) -> None:
        canvas = self.canvas
        canvas.clear()  # takes the items out of the scene; self.figures keeps them alive
        style = self.style
        if style is not None:
            canvas.setBackground(style.background)
        canvas.ci.setContentsMargins(4, 4, 10, 4)
        if self.message_text is not None:
            canvas.addLabel(self.message_text, color=style.muted if style else None, size="11pt")
            self.switch_bar.hide()
            self.side_by_side = None
            return
        self.side_by_side = self._wants_side_by_side()
        shown = list(enumerate(self.figures)) if self.side_by_side else [(self.selected, self.figures[self.selected])] if self.figures else []
        self.switch_bar.setVisible(len(self.figures) > 1 and not self.side_by_side)
        for col, (_index, (_name, _label, item)) in enumerate(shown):
            canvas.addItem(item, row=0, col=col)
            legend = self._legend_below(item)
            if legend is not None:
                canvas.addItem(legend, row=1, col=col)
            canvas.ci.layout.setColumnStretchFactor(col, 1)

    def _legend_below(self, item: Any) -> Any:
        import pyqtgraph as pg

        inside = getattr(item, "legend", None)
        if inside is None or not inside.items:
            return None
        below = getattr(item, "_alloy_legend_below", None)
        if below is None:
            below = pg.LegendItem(offset=None, labelTextColor=self.style.foreground, labelTextSize="9pt")
            for sample, label in inside.items:
                below.addItem(sample.item, label.text)
            inside.setVisible(False)
            item._alloy_legend_below = below
        return below

    def _rebuild_switch(self) -> None:
        for button in self.switch_group.buttons():
            self.switch_group.removeButton(button)
            button.deleteLater()
        while self.switch_layout.count():
            self.switch_layout.takeAt(0)
        for i, (_name, label, _item) in enumerate(self.figures):
            button = QToolButton()
            button.setText(label)
            button.setCheckable(True)
            button.setChecked(i == self.selected)
            button.setAutoRaise(True)
            button.setToolTip(f"Show: {label} (widen the window to see the figures side by side)")
            self.switch_group.addButton(button, i)
            self.switch_layout.addWidget(button)
        self.switch_layout.addStretch(1)

    def _picked(self, index: int) -> None:
        self.selected = index
        self.arrange()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._relayout.start()

    def _maybe_rearrange(self) -> None:
        if self.figures and self._wants_side_by_side() != self.side_by_side:
            self.arrange()
