"""The interference preview: the analysis of the current recipe, recomputed in the background.

Every request cancels the one before it; the newest result wins. A density
change redraws at once from the stored density grid (the analysis keeps
the sign-conflict counts at every grid density) and the exact numbers follow
from the background run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMenu,
    QProgressBar,
    QStackedWidget,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .resources import set_icon
from .figure_tab import FigureTab
from .theme import current_colors
from .workers import Job
from .workspace import human_count, human_seconds

TAB_SIMILARITY, TAB_CONFLICTS, TAB_MAGNITUDES, TAB_PCB, TAB_ALIGNMENT, TAB_RETENTION = range(6)
TAB_TITLES = ("Similarity", "Sign conflicts", "Magnitudes", "PCB scores", "Alignment")  # Retention is added after a merge
TAB_FILES = ("similarity", "sign-conflicts", "magnitudes", "pcb-scores", "alignment", "retention")

# Which recipe parameter the sign-conflict and threshold figures follow, per method.
DENSITY_PARAMS = {"ties": "density", "dare_ties": "trim_density", "breadcrumbs": "density", "dare_linear": "density"}
DEFAULT_PREVIEW_DENSITY = 0.2


GETTING_STARTED = """
<div style='line-height:140%'>
<p style='font-size:13pt'><b>How a merge goes</b></p>
<p><b>1.</b> Drop checkpoints on the window (or <i>Open demo</i>): a base model and the models fine-tuned from it.<br>
<b>2.</b> Pick a method; the plots here show how the fine-tunes' changes agree or fight, as you change its settings.<br>
<b>3.</b> Merge, then export to a folder or to the Hugging Face Hub. Save the recipe to repeat it with <code>alloy merge</code>.</p>
</div>
"""


@dataclass
class PreviewData:
    analysis: Any  # merging.analysis RecipeAnalysis
    barrier: Any = None  # merging.alignment BarrierResult (demo models only)
    density: float = DEFAULT_PREVIEW_DENSITY


def preview_density(recipe: Any) -> float:
    """The trim density the figures mark: the recipe's own, else TIES' default."""
    key = DENSITY_PARAMS.get(recipe.merge_method)
    value = recipe.parameters.get(key) if key else None
    if isinstance(value, list):
        nums = [float(v) for v in value if isinstance(v, (int, float))]
        value = sum(nums) / len(nums) if nums else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    if key:
        try:
            return float(recipe.method.param(key).default)
        except KeyError:
            pass
    return DEFAULT_PREVIEW_DENSITY


def preview_job(recipe: Any):
    """Run the analysis of the recipe (and, for aligned demo models, the loss barrier)."""

    def run(progress, cancel) -> PreviewData:
        from merging.analysis import analyze_recipe, default_cache_dir

        analysis = analyze_recipe(recipe, progress=progress, cancel=cancel, cache_dir=default_cache_dir())
        barrier = None
        if recipe.alignment is not None and len(recipe.models) >= 2:
            barrier = demo_barrier(recipe, cancel)
        return PreviewData(analysis, barrier, preview_density(recipe))

    return run


def demo_barrier(recipe: Any, cancel: Any) -> Any:
    """Loss along the straight path reference → other, naive and aligned; demo models only (they have test data)."""
    from merging import demo_models
    from merging.alignment import loss_barrier
    from merging.checkpoint import open_checkpoint
    from merging.executor import open_inputs

    from .jobs import is_demo_model

    if not all(is_demo_model(m.path) for m in recipe.models) or recipe.alignment.reference is not None:
        return None
    inputs = open_inputs(recipe, cancel=cancel)
    try:
        a, aligned = inputs.models[0], inputs.models[1]
        b = open_checkpoint(recipe.models[1].path)
        config = demo_models.load_config(recipe.models[0].path)
        state = lambda ck: {n: ck.get(n) for n in ck.names()}  # noqa: E731 - demo models are tiny
        cancel.raise_if_cancelled()
        return loss_barrier(lambda p: demo_models.evaluate(p, config), state(a), state(b), state(aligned))
    finally:
        inputs.close()


def plot_style() -> Any:
    """The figures' colours for the current palette."""
    from .plots import PlotStyle

    c = current_colors()
    return PlotStyle(background=c.plot_background, foreground=c.plot_foreground, muted=c.muted, accent=c.accent,
                     conflict="#ff7b7b" if c.dark else "#d62728", title_size="11pt", label_size="10pt", tick_points=9.0)


def barrier_plot(barrier: Any, style: Any) -> Any:
    """Test loss along the straight path between the two models, naive and after alignment."""
    import numpy as np
    import pyqtgraph as pg

    plot = pg.PlotItem()
    plot.setTitle(f"Loss barrier: {barrier.naive_barrier:.3f} naive, {barrier.aligned_barrier:.3f} aligned",
                  color=style.foreground, size=style.title_size)
    for side, text in (("bottom", "α (0 = reference, 1 = other model)"), ("left", "test loss")):
        axis = plot.getAxis(side)
        axis.setPen(pg.mkPen(style.foreground))
        axis.setTextPen(pg.mkPen(style.foreground))
        axis.setLabel(text, color=style.foreground)
        axis.enableAutoSIPrefix(False)
    plot.showGrid(x=True, y=True, alpha=0.2)
    plot.setMenuEnabled(False)
    plot.addLegend(offset=(10, 10), labelTextColor=style.foreground)
    alphas = np.asarray(barrier.alphas, dtype=float)
    for losses, color, name in ((barrier.naive.losses, style.conflict, "naive interpolation"),
                                (barrier.aligned.losses, style.accent, "after alignment")):
        plot.plot(alphas, np.asarray(losses, dtype=float), pen=pg.mkPen(color, width=2), symbol="o", symbolSize=5,
                  symbolBrush=color, symbolPen=None, name=name)
    return plot


class PreviewPanel(QWidget):
    computed = Signal(object)  # PreviewData
    failed = Signal(str)
    busy_changed = Signal(bool)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.data: PreviewData | None = None
        self.density = DEFAULT_PREVIEW_DENSITY
        self.method = ""
        self.job: Job | None = None
        self.items: dict[str, Any] = {}  # name -> the pyqtgraph item on screen
        self.retention: Any = None  # an AnalysisResult with retention, after a merge
        self.widgets: list[Any] = []
        self.runs = 0  # analyses started (tests and the status line)
        self._data_key: str | None = None  # the recipe (YAML) of the result on screen
        self._pending_key: str | None = None  # the recipe being analysed
        self._ready = False

        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        head = QHBoxLayout()
        title = QLabel("Interference preview")
        title.setObjectName("PanelTitle")
        head.addWidget(title)
        self.busy = QProgressBar()
        self.busy.setObjectName("PreviewBusy")
        self.busy.setRange(0, 0)
        self.busy.setMaximumWidth(140)
        self.busy.setMaximumHeight(14)
        self.busy.setTextVisible(False)
        self.busy.setToolTip("Computing the preview in the background")
        self.busy.hide()
        head.addWidget(self.busy)
        self.info = QLabel()
        self.info.setObjectName("Muted")
        head.addWidget(self.info, 1)
        self.save_button = QToolButton()
        set_icon(self.save_button, "save-plot")
        self.save_button.setText("Save plot")
        self.save_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.save_button.setToolTip("Save the plot on screen as PNG or SVG")
        self.save_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(self.save_button)
        menu.addAction("As PNG…", lambda: self.save_dialog("png"))
        menu.addAction("As SVG…", lambda: self.save_dialog("svg"))
        self.save_button.setMenu(menu)
        self.save_button.setEnabled(False)
        head.addWidget(self.save_button)
        layout.addLayout(head)

        self.stack = QStackedWidget()
        self.message = QLabel()
        self.message.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.message.setWordWrap(True)
        self.message.setObjectName("Muted")
        self.stack.addWidget(self.message)
        self.tabs = QTabWidget()
        self.tabs.setObjectName("PreviewTabs")
        self.tabs.setDocumentMode(True)
        self.stack.addWidget(self.tabs)
        layout.addWidget(self.stack, 1)
        self.show_message(GETTING_STARTED, rich=True)

    # -- setup ------------------------------------------------------------------------------------
    def engine_ready(self) -> None:
        """Make the plot widgets (pyqtgraph is imported by now)."""
        import pyqtgraph as pg

        pg.setConfigOptions(antialias=True)
        for title in TAB_TITLES:
            w = FigureTab(f"Plot{title.replace(' ', '')}")
            self.widgets.append(w)
            self.tabs.addTab(w, title)
        self.tabs.currentChanged.connect(lambda _i: self._update_save())
        self._ready = True

    def apply_theme(self) -> None:
        if self.data is not None:
            self._draw_all()

    # -- state -------------------------------------------------------------------------------------
    def show_message(self, text: str, *, rich: bool = False) -> None:
        self.stack.setCurrentIndex(0)
        self.message.setTextFormat(Qt.TextFormat.RichText if rich else Qt.TextFormat.PlainText)
        self.message.setText(text)
        self._update_save()

    def clear(self, text: str, *, rich: bool = False) -> None:
        self.cancel()
        self._data_key = None
        self.data = None
        self.items = {}
        self.info.setText("")
        self.show_message(text, rich=rich)

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.job = None
            self._set_busy(False)

    def request(self, recipe: Any) -> Job | None:
        """Analyse `recipe` in the background; an older run still going is cancelled.

        The same recipe as the one on screen (or being computed) is not analysed again.
        """
        key = recipe.to_yaml()
        if self.running and key == self._pending_key:
            return None  # already being computed
        if key == self._data_key and self.data is not None:
            self.cancel()  # back to what is on screen
            return None
        self._pending_key = key
        self.cancel()
        self.drop_retention()
        self.method = recipe.merge_method
        self.density = preview_density(recipe)
        if self.data is not None:
            self._draw_density_figures()  # instant, from the grid the last result holds
        job = Job(preview_job(recipe), name="preview", throttle_s=0.1)
        job.progress.connect(self._on_progress)
        job.succeeded.connect(lambda data, j=job: self._on_done(j, data))
        job.failed.connect(lambda msg, j=job: self._on_failed(j, msg))
        job.finished.connect(lambda j=job: self._on_finished(j))
        self.job = job
        self.runs += 1
        self._set_busy(True)
        job.start()
        return job

    def set_density(self, density: float) -> None:
        """Move the density markers now (interpolated on the stored grid)."""
        self.density = float(density)
        if self.data is not None:
            self._draw_density_figures()

    def _set_busy(self, on: bool) -> None:
        self.busy.setVisible(on)
        if on:
            self.info.setText("Computing…")
        self.busy_changed.emit(on)

    def _on_progress(self, event: Any) -> None:
        frac = getattr(event, "fraction", None)
        if frac is not None:
            self.info.setText(f"Computing… {frac:.0%}")

    def _on_done(self, job: Job, data: PreviewData) -> None:
        if job is not self.job:
            return  # a newer request replaced this one
        self.data = data
        self._data_key = self._pending_key
        self.density = data.density
        self._draw_all()
        self.computed.emit(data)

    def _on_failed(self, job: Job, message: str) -> None:
        if job is not self.job:
            return
        self._data_key = None
        self.data = None
        self.info.setText("")
        self.show_message(f"No preview: {message}")
        self.failed.emit(message)

    def _on_finished(self, job: Job) -> None:
        if job is self.job:
            self.job = None
            self._set_busy(False)
            if self.data is not None:
                self.info.setText(self._summary())

    # -- drawing -------------------------------------------------------------------------------------
    def _summary(self) -> str:
        data = self.data
        if data is None:
            return ""
        res = data.analysis.interference
        parts = []
        if res is not None:
            how = f"sampled ({human_count(res.sample_size)} per tensor)" if res.sampled else "exact"
            parts.append(f"{res.n_models} models · {human_count(res.total_params)} parameters · {how} · {res.scope} trim")
            parts.append(human_seconds(res.elapsed_s))
        elif data.analysis.alignments:
            parts.append("alignment similarity")
        return " · ".join(parts)

    def _draw_all(self) -> None:
        from . import plots

        data = self.data
        if data is None or not self._ready:
            return
        style = plot_style()
        res = data.analysis.interference
        self.stack.setCurrentIndex(1)
        self.items = {}
        if res is not None:
            self._fill(TAB_SIMILARITY, style, [("cosine", "Whole model", plots.cosine_heatmap(res, style=style)),
                                               ("cosine_layers", "Per layer", plots.cosine_per_layer_plot(res, style))])
            self._draw_density_figures()
            self._fill(TAB_PCB, style, [("pcb_scores", "Score distribution", plots.pcb_score_plot(res, style)),
                                        ("pcb_kept", "Kept per layer", plots.pcb_kept_plot(res, style))])
        else:
            for tab in (TAB_SIMILARITY, TAB_CONFLICTS, TAB_MAGNITUDES, TAB_PCB):
                self._message(tab, style, "Interference is measured against a base model: mark one row as the base.")
        figures = [("alignment", "Similarity before / after", plots.alignment_plot(al, style))
                   for al in data.analysis.alignments[:1]]
        if data.barrier is not None:
            figures.append(("barrier", "Loss barrier", barrier_plot(data.barrier, style)))
        if figures:
            self._fill(TAB_ALIGNMENT, style, figures)
        else:
            self._message(TAB_ALIGNMENT, style, "Alignment results appear here when 'Align models first' is on.")
        if self.retention is not None:
            self.show_retention(self.retention)
        if res is None and data.analysis.alignments:
            self.tabs.setCurrentIndex(TAB_ALIGNMENT)
        self._update_save()

    def _draw_density_figures(self) -> None:
        from . import plots

        data = self.data
        if data is None or not self._ready or data.analysis.interference is None:
            return
        res = data.analysis.interference
        style = plot_style()
        self._fill(TAB_CONFLICTS, style, [
            ("conflict_layers", "Per layer at this density", plots.sign_conflict_per_layer(res, self.density, style)),
            ("conflict_density", "Against density", plots.sign_conflict_vs_density(res, self.density, style)),
        ])
        self._fill(TAB_MAGNITUDES, style, [
            ("magnitudes", "Histogram and trim threshold", plots.magnitude_histogram_plot(res, self.density, style=style)),
            ("norms", "Size per layer", plots.norms_plot(res, style)),
        ])

    def show_retention(self, result: Any) -> None:
        """After a merge: how much of each task vector the merged model keeps, per layer."""
        from . import plots

        self.retention = result
        if not self._ready or result is None or not getattr(result, "has_retention", False):
            return
        if self.tabs.count() == len(TAB_TITLES):
            w = FigureTab("PlotRetention")
            self.widgets.append(w)
            self.tabs.addTab(w, "Retention")
        style = plot_style()
        self._fill(TAB_RETENTION, style, [("retention", "Per layer", plots.retention_plot(result, style))])
        self.stack.setCurrentIndex(1)
        self._update_save()

    def drop_retention(self) -> None:
        """The settings changed: the last merge's retention no longer describes them."""
        self.retention = None
        if self.tabs.count() > TAB_RETENTION:
            widget = self.widgets.pop(TAB_RETENTION)
            self.tabs.removeTab(TAB_RETENTION)
            widget.deleteLater()

    def _fill(self, tab: int, style: Any, figures: list[tuple[str, str, Any]]) -> None:
        """Show the figures of one tab (side by side when there is room)."""
        widget = self.widgets[tab]
        for name, _label, _item in widget.figures:
            self.items.pop(name, None)
        widget.set_figures(figures, style)
        self.items.update(widget.items)

    def _message(self, tab: int, style: Any, text: str) -> None:
        widget = self.widgets[tab]
        for name, _label, _item in widget.figures:
            self.items.pop(name, None)
        widget.show_message(text, style)

    # -- export --------------------------------------------------------------------------------------
    def _update_save(self) -> None:
        self.save_button.setEnabled(self.stack.currentIndex() == 1 and self.data is not None)

    def save_dialog(self, kind: str) -> None:
        """Ask where, then save the visible figure; the folder is remembered."""
        tab = self.tabs.currentIndex()
        name = f"{TAB_FILES[tab]}.{kind}"
        window = self.window()
        settings = getattr(window, "settings", None)
        start = settings.last_folder("plots") if settings is not None else str(Path.home())
        path, _ = QFileDialog.getSaveFileName(self, "Save plot", str(Path(start) / name),
                                              "PNG image (*.png)" if kind == "png" else "SVG drawing (*.svg)")
        if not path:
            return
        try:
            saved = self.save_plot(Path(path), tab)
        except OSError as exc:
            self.info.setText(f"Not saved: {exc}")
            return
        if settings is not None:
            settings.set_last_folder("plots", saved)
        self.info.setText(f"Saved {saved.name}")

    def save_plot(self, path: Path, tab: int | None = None) -> Path:
        """Write the figure of `tab` (default: the visible one) as PNG or SVG, by the file's suffix."""
        import pyqtgraph.exporters as exporters

        tab = self.tabs.currentIndex() if tab is None else tab
        widget = self.widgets[tab].canvas
        path = Path(path)
        if path.suffix.lower() not in (".png", ".svg"):
            path = path.with_suffix(".png")
        scene = widget.scene()
        if path.suffix.lower() == ".svg":
            _save_svg(scene, path, widget.ci.sceneBoundingRect(), self.tabs.tabText(tab))
        else:
            exporter = exporters.ImageExporter(scene)
            exporter.parameters()["width"] = max(800, int(widget.width() * 2))
            exporter.export(str(path))
        return path


def _save_svg(scene, path: Path, rect, title: str) -> None:
    """Qt's own SVG writer (vector output of the whole figure, legends and labels included)."""
    from PySide6.QtCore import QRectF, QSize
    from PySide6.QtGui import QPainter
    from PySide6.QtSvg import QSvgGenerator

    generator = QSvgGenerator()
    generator.setFileName(str(path))
    generator.setSize(QSize(int(rect.width()), int(rect.height())))
    generator.setViewBox(QRectF(0, 0, rect.width(), rect.height()))
    generator.setTitle(f"Alloy — {title}")
    painter = QPainter(generator)
    try:
        scene.render(painter, QRectF(0, 0, rect.width(), rect.height()), rect)
    finally:
        painter.end()
