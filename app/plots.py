"""The analysis figures as pyqtgraph plot items, and their rendering to PNG files (offscreen).

One function per figure takes an analysis result (`merging.analysis`) and
returns a `pg.PlotItem` that a window can place in any layout, or that
`render_analysis_pngs` draws alone into an image: this is how `alloy analyze
--plots DIR` produces figures without a window (`QT_QPA_PLATFORM=offscreen`
works). Every number drawn comes from the result's accessors; nothing is
recomputed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QFont

MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
DEFAULT_SIZE = (1000, 620)


@dataclass(frozen=True)
class PlotStyle:
    background: str = "#ffffff"
    foreground: str = "#1d2129"
    muted: str = "#6b7280"
    accent: str = "#2f6fde"
    conflict: str = "#d62728"
    title_size: str = "13pt"
    label_size: str = "11pt"
    tick_points: float = 10.0


LIGHT = PlotStyle()
DARK = PlotStyle("#16181d", "#e6e8ec", "#9aa1ad", "#5b9bff", "#ff7b7b")


def model_color(i: int) -> str:
    return MODEL_COLORS[i % len(MODEL_COLORS)]


def _short(label: str, limit: int = 22) -> str:
    return label if len(label) <= limit else "…" + label[-(limit - 1):]


def _new_plot(style: PlotStyle, title: str, x: str, y: str, *, grid: bool = True) -> pg.PlotItem:
    pg.mkQApp()  # plot items need a Qt application (offscreen is fine)
    plot = pg.PlotItem()
    plot.setTitle(title, color=style.foreground, size=style.title_size)
    font = QFont()
    font.setPointSizeF(style.tick_points)
    for side, text in (("bottom", x), ("left", y)):
        axis = plot.getAxis(side)
        axis.setPen(pg.mkPen(style.foreground))
        axis.setTextPen(pg.mkPen(style.foreground))
        axis.setStyle(tickFont=font)
        axis.setLabel(text, color=style.foreground, **{"font-size": style.label_size})
        axis.enableAutoSIPrefix(False)
    if grid:
        plot.showGrid(x=True, y=True, alpha=0.2)
    plot.setMenuEnabled(False)
    return plot


def _legend(plot: pg.PlotItem, style: PlotStyle, offset: tuple[int, int] = (-10, 10), columns: int = 1) -> pg.LegendItem:
    legend = plot.addLegend(offset=offset, labelTextColor=style.foreground, labelTextSize="10pt", colCount=columns)
    legend.setBrush(pg.mkBrush(style.background + "e0"))
    legend.setPen(pg.mkPen(style.muted))
    return legend


def _layer_axis(plot: pg.PlotItem, labels: Sequence[str], limit: int = 14) -> None:
    """Tick labels for a layer axis: block numbers for `layer N`, short module names otherwise.

    At most about `limit` labels: the first, the last, and every step-th between
    them (none too close to the last one).
    """
    last = len(labels) - 1
    step = max(1, math.ceil(len(labels) / limit))
    chosen = [i for i in range(0, last + 1, step) if i == 0 or last - i >= max(1, step // 2 + 1) or i == last]
    if last not in chosen:
        chosen.append(last)
    ticks = []
    for i in chosen:
        label = labels[i]
        if label.startswith("layer ") and label[6:].isdigit():
            text = label[6:]
        else:
            text = _short(label.rsplit(".", 1)[-1] if len(label) > 12 else label, 12)
        ticks.append((float(i), text))
    axis = plot.getAxis("bottom")
    axis.setTicks([ticks])
    # no vertical grid on a categorical axis; labels at the ends may reach past the plot's edge
    plot.showGrid(x=False, y=True, alpha=0.2)
    axis.setStyle(hideOverlappingLabels=60)
    plot.setXRange(-0.6, len(labels) - 0.4, padding=0)


def _layer_title(labels: Sequence[str]) -> str:
    numbered = all(lab.startswith("layer ") for lab in labels)
    return "layer (block index)" if numbered else "layer (block index or module)"


def _percent(values: Any) -> np.ndarray:
    return 100.0 * np.asarray(values, dtype=float)


def _sample_note(result: Any) -> str:
    if getattr(result, "sampled", False):
        return f" — sampled, {result.sample_size:,} per tensor"
    return ""


# -- the figures -------------------------------------------------------------------------------------------------


def cosine_heatmap(result: Any, layer: int | None = None, style: PlotStyle = LIGHT) -> pg.PlotItem:
    """n×n heat map of cos(τ_i, τ_j) (overall, or one layer) with the value written in each cell."""
    cos = np.asarray(result.cosine("overall") if layer is None else result.cosine("layer")[layer], dtype=float)
    n = cos.shape[0]
    where = "whole model" if layer is None else result.layer_labels[layer]
    plot = _new_plot(style, f"Cosine similarity of task vectors ({where}){_sample_note(result)}", "model", "model", grid=False)
    cmap = pg.colormap.get("CET-D1") if "CET-D1" in pg.colormap.listMaps() else pg.colormap.get("viridis")
    image = pg.ImageItem(cos.T)
    image.setLookupTable(cmap.getLookupTable(nPts=256))
    image.setLevels((-1.0, 1.0))
    image.setRect(QRectF(-0.5, -0.5, n, n))
    plot.addItem(image)
    plot.invertY(True)
    plot.setAspectLocked(True)
    ticks = [(float(i), _short(lab, 16)) for i, lab in enumerate(result.model_labels)]
    plot.getAxis("bottom").setTicks([ticks])
    plot.getAxis("left").setTicks([ticks])
    font = QFont()
    font.setPointSizeF(12 if n <= 5 else 9)
    font.setBold(True)
    for i in range(n):
        for j in range(n):
            v = cos[i, j]
            text = pg.TextItem(f"{v:+.3f}" if i != j else f"{v:.0f}", color="#ffffff" if abs(v) > 0.6 else "#111111", anchor=(0.5, 0.5))
            text.setFont(font)
            text.setPos(j, i)
            plot.addItem(text)
    bar = pg.ColorBarItem(values=(-1, 1), colorMap=cmap, interactive=False, width=16)
    bar.setImageItem(image, insert_in=plot)
    bar.axis.setTextPen(pg.mkPen(style.foreground))
    bar.axis.setPen(pg.mkPen(style.foreground))
    bar.axis.setLabel("cosine (−1 opposite, +1 same direction)", color=style.foreground)
    return plot


def cosine_per_layer_plot(result: Any, style: PlotStyle = LIGHT) -> pg.PlotItem:
    """cos(τ_i, τ_j) of every pair of models, layer by layer."""
    cos = np.asarray(result.cosine("layer"), dtype=float)
    n = cos.shape[1] if cos.ndim == 3 else 0
    plot = _new_plot(style, f"Cosine similarity of task vectors per layer{_sample_note(result)}", _layer_title(result.layer_labels),
                     "cos(τ<sub>i</sub>, τ<sub>j</sub>)")
    _legend(plot, style)
    xs = np.arange(cos.shape[0], dtype=float)
    overall = np.asarray(result.cosine("overall"), dtype=float)
    k = 0
    for i in range(n):
        for j in range(i + 1, n):
            color = MODEL_COLORS[k % len(MODEL_COLORS)]
            plot.plot(xs, cos[:, i, j], pen=pg.mkPen(color, width=2), symbol="o", symbolSize=6, symbolBrush=color, symbolPen=None,
                      name=f"{_short(result.model_labels[i], 16)} · {_short(result.model_labels[j], 16)} (whole model {overall[i, j]:+.3f})")
            k += 1
    plot.addItem(pg.InfiniteLine(pos=0.0, angle=0, pen=pg.mkPen(style.muted, width=1)))
    _layer_axis(plot, result.layer_labels)
    plot.setYRange(-1.0, 1.0, padding=0.03)
    return plot


def norms_plot(result: Any, style: PlotStyle = LIGHT) -> pg.PlotItem:
    """RMS of each model's task vector per layer (‖τ‖/√parameters)."""
    rms = np.asarray(result.rms("layer"), dtype=float)
    plot = _new_plot(style, f"Task-vector size per layer{_sample_note(result)}", _layer_title(result.layer_labels),
                     "RMS of τ per parameter (weight units)")
    _legend(plot, style)
    xs = np.arange(rms.shape[0], dtype=float)
    for i, label in enumerate(result.model_labels):
        y = rms[:, i]
        ok = y > 0
        plot.plot(xs[ok], y[ok], pen=pg.mkPen(model_color(i), width=2), symbol="o", symbolSize=6,
                  symbolBrush=model_color(i), symbolPen=None, name=f"{_short(label)} (‖τ‖ = {result.norms()[i]:.3g})")
    plot.setYRange(0, max(float(rms.max(initial=0.0)), 1e-30) * 1.08, padding=0)
    _layer_axis(plot, result.layer_labels)
    return plot


def sign_conflict_vs_density(result: Any, density: float | None = None, style: PlotStyle = LIGHT) -> pg.PlotItem:
    """Sign-conflict rate after trimming against density: the whole model, each layer, and the mass TIES discards."""
    d = np.asarray(result.densities, dtype=float)
    per_layer = _percent(result.sign_conflict("layer"))
    plot = _new_plot(style, f"Sign conflicts after trimming ({result.scope} trim){_sample_note(result)}",
                     "density (fraction of each task vector kept)", "percent")
    _legend(plot, style, offset=(-10, -10))
    L = per_layer.shape[0]
    cmap = pg.colormap.get("viridis")
    for li in range(L):
        color = cmap.map(0.05 + 0.8 * (li / max(1, L - 1)), mode="qcolor")
        name = None
        if li == 0:
            name = f"each layer, from {_short(result.layer_labels[0], 14)} (dark) …"
        elif li == L - 1:
            name = f"… to {_short(result.layer_labels[-1], 14)} (light)"
        color.setAlpha(150)
        plot.plot(d, per_layer[li], pen=pg.mkPen(color, width=1), name=name)
    plot.plot(d, _percent(result.sign_conflict("overall")), pen=pg.mkPen(style.conflict, width=3), symbol="o",
              symbolSize=6, symbolBrush=style.conflict, symbolPen=None,
              name="whole model: % of contested parameters (kept by 2+ models) with both signs")
    plot.plot(d, _percent(result.discarded_mass_fraction("overall")), pen=pg.mkPen(style.accent, width=2.5, style=Qt.PenStyle.DashLine),
              name="whole model: % of kept |τ| mass TIES discards")
    if density is not None:
        plot.addItem(pg.InfiniteLine(pos=density, angle=90, pen=pg.mkPen(style.foreground, width=1.5, style=Qt.PenStyle.DotLine),
                                     label=f"density {density:g}", labelOpts={"color": style.foreground, "position": 0.08}))
    plot.setXRange(0, 1.0, padding=0.02)
    plot.setYRange(0, 100, padding=0.02)
    return plot


def sign_conflict_per_layer(result: Any, density: float, style: PlotStyle = LIGHT) -> pg.PlotItem:
    """Per-layer sign-conflict rate at one density (bars) with the whole-model rate (line)."""
    per_layer = _percent(result.sign_conflict_at(density, "layer"))
    overall = 100.0 * float(result.sign_conflict_at(density, "overall"))
    plot = _new_plot(style, f"Sign conflicts per layer at density {density:g}{_sample_note(result)}",
                     _layer_title(result.layer_labels), "% of contested parameters")
    _legend(plot, style, offset=(-10, -10))
    xs = np.arange(per_layer.size, dtype=float)
    plot.addItem(pg.BarGraphItem(x=xs, height=per_layer, width=0.7, brush=style.conflict, pen=None, name="conflicting / contested"))
    plot.addItem(pg.InfiniteLine(pos=overall, angle=0, pen=pg.mkPen(style.foreground, width=2, style=Qt.PenStyle.DashLine)))
    plot.plot([], [], pen=pg.mkPen(style.foreground, width=2, style=Qt.PenStyle.DashLine), name=f"whole model: {overall:.1f} %")
    _layer_axis(plot, result.layer_labels)
    plot.setYRange(0, 100, padding=0.02)
    return plot


def magnitude_histogram_plot(result: Any, density: float, layer: int | None = None, style: PlotStyle = LIGHT,
                             bins: int = 60) -> pg.PlotItem:
    """Histogram of log10 |τ_i| per model (shared bins) with each model's trim threshold at `density`."""
    edges, counts = result.magnitude_histogram(layer, bins=bins)
    edges = np.asarray(edges, dtype=float)
    counts = np.asarray(counts, dtype=float)
    where = "whole model" if layer is None else result.layer_labels[layer]
    plot = _new_plot(style, f"Magnitudes of task-vector entries ({where}){_sample_note(result)}",
                     "log10 |τ| (|τ| in weight units; exact zeros left out)", "parameters per bin")
    _legend(plot, style, offset=(10, 10))
    for i, label in enumerate(result.model_labels):
        color = model_color(i)
        t = float(result.threshold_for(i, density, layer))
        name = f"{_short(label)}: trim at |τ| ≥ {t:.2e}" if t > 0 else f"{_short(label)}: keeps all"
        plot.plot(edges, counts[i], stepMode="center", pen=pg.mkPen(color, width=2), name=name)
        if t > 0:
            plot.addItem(pg.InfiniteLine(pos=math.log10(t), angle=90, pen=pg.mkPen(color, width=1.5, style=Qt.PenStyle.DashLine)))
    plot.plot([], [], pen=pg.mkPen(style.foreground, width=1.5, style=Qt.PenStyle.DashLine),
              name=f"dashed: threshold at density {density:g} (kept to the right)")
    return plot


def pcb_score_plot(result: Any, style: PlotStyle = LIGHT, bins: int = 60) -> pg.PlotItem:
    """Distribution of positive PCB scores per model; the legend gives the share that opposes the consensus."""
    edges, pos, _neg = result.pcb_score_histogram(None, bins=bins)
    negative = np.asarray(result.pcb_negative_fraction("overall"), dtype=float)
    plot = _new_plot(style, f"PCB scores (keep ratio {result.pcb_ratio:g}, {result.scope} scope){_sample_note(result)}",
                     "log10 score (positive scores; score = intra × inter balancing)", "parameters per bin")
    _legend(plot, style, offset=(10, 10))
    cutoffs = np.asarray(result.pcb_cutoff, dtype=float)
    one_cutoff = result.scope == "global" and cutoffs.size > 0
    for i, label in enumerate(result.model_labels):
        color = model_color(i)
        plot.plot(np.asarray(edges, float), np.asarray(pos[i], float), stepMode="center", pen=pg.mkPen(color, width=2),
                  name=f"{_short(label)}: {negative[i]:.0%} negative (against the consensus; not shown)")
        if one_cutoff and cutoffs[0, i] > 0:
            plot.addItem(pg.InfiniteLine(pos=math.log10(cutoffs[0, i]), angle=90, pen=pg.mkPen(color, width=1.5, style=Qt.PenStyle.DashLine)))
    if one_cutoff:
        plot.plot([], [], pen=pg.mkPen(style.foreground, width=1.5, style=Qt.PenStyle.DashLine),
                  name="dashed: drop cutoff (scores to the right are kept)")
    return plot


def pcb_kept_plot(result: Any, style: PlotStyle = LIGHT) -> pg.PlotItem:
    """Fraction of each layer's parameters that PCB keeps (weight > 0), per model."""
    kept = _percent(result.pcb_kept_fraction("layer"))
    overall = _percent(result.pcb_kept_fraction("overall"))
    plot = _new_plot(style, f"Kept by PCB per layer (keep ratio {result.pcb_ratio:g}, {result.scope} scope){_sample_note(result)}",
                     _layer_title(result.layer_labels), "% of the layer's parameters kept")
    _legend(plot, style)
    xs = np.arange(kept.shape[0], dtype=float)
    for i, label in enumerate(result.model_labels):
        plot.plot(xs, kept[:, i], pen=pg.mkPen(model_color(i), width=2), symbol="o", symbolSize=6,
                  symbolBrush=model_color(i), symbolPen=None, name=f"{_short(label)} (whole model {overall[i]:.1f} %)")
    _layer_axis(plot, result.layer_labels)
    plot.setYRange(0, max(1.0, float(kept.max(initial=0.0)) * 1.15), padding=0)
    return plot


def retention_plot(result: Any, style: PlotStyle = LIGHT) -> pg.PlotItem:
    """cos(τ_merged, τ_i) per layer: how much of each model's task vector the merge keeps."""
    ret = np.asarray(result.retention("layer"), dtype=float)
    overall = np.asarray(result.retention("overall"), dtype=float)
    plot = _new_plot(style, f"Retention after the merge{_sample_note(result)}", _layer_title(result.layer_labels),
                     "cos(τ<sub>merged</sub>, τ<sub>i</sub>)")
    _legend(plot, style, offset=(-10, -10))
    xs = np.arange(ret.shape[0], dtype=float)
    for i, label in enumerate(result.model_labels):
        plot.plot(xs, ret[:, i], pen=pg.mkPen(model_color(i), width=2), symbol="o", symbolSize=6,
                  symbolBrush=model_color(i), symbolPen=None, name=f"{_short(label)} (whole model {overall[i]:.3f})")
    _layer_axis(plot, result.layer_labels)
    plot.setYRange(min(0.0, float(ret.min(initial=0.0))), 1.0, padding=0.03)
    return plot


def alignment_plot(alignment: Any, style: PlotStyle = LIGHT) -> pg.PlotItem:
    """Per-layer cosine similarity of reference and other model, before and after permutation."""
    before = np.asarray(alignment.cosine_before("layer"), dtype=float)
    after = np.asarray(alignment.cosine_after("layer"), dtype=float)
    note = f" — sampled, {alignment.sample_size:,} per tensor" if alignment.sampled else ""
    plot = _new_plot(style, f"{_short(alignment.other_label)} vs {_short(alignment.reference_label)}: weights before / after alignment{note}",
                     _layer_title(alignment.layer_labels), "cos(θ<sub>reference</sub>, θ<sub>other</sub>)")
    _legend(plot, style, offset=(-10, 10))
    xs = np.arange(before.size, dtype=float)
    b_all = float(alignment.cosine_before("overall"))
    a_all = float(alignment.cosine_after("overall"))
    plot.addItem(pg.BarGraphItem(x=xs - 0.19, height=before, width=0.36, brush=style.muted, pen=None, name=f"before (whole model {b_all:.3f})"))
    plot.addItem(pg.BarGraphItem(x=xs + 0.19, height=after, width=0.36, brush=style.accent, pen=None, name=f"after (whole model {a_all:.3f})"))
    _layer_axis(plot, alignment.layer_labels)
    plot.setYRange(min(0.0, float(before.min(initial=0.0))), 1.1, padding=0)
    return plot


# -- rendering -----------------------------------------------------------------------------------------------------


def render_png(item: pg.PlotItem, path: str | Path, size: tuple[int, int] = DEFAULT_SIZE, style: PlotStyle = LIGHT) -> Path:
    """Draw one plot item alone into a PNG of `size` pixels (works offscreen)."""
    app = pg.mkQApp()
    widget = pg.GraphicsLayoutWidget()
    widget.setBackground(style.background)
    widget.ci.setContentsMargins(12, 10, 18, 10)
    widget.addItem(item, row=0, col=0)
    inside = getattr(item, "legend", None)
    if inside is not None and inside.items:
        # In a picture the legend goes under the plot, where it cannot hide data.
        longest = max(len(label.text) for _, label in inside.items)
        columns = 2 if (len(inside.items) > 2 and longest <= 48) else 1
        below = pg.LegendItem(offset=None, labelTextColor=style.foreground, labelTextSize="10pt", colCount=columns)
        for sample, label in inside.items:
            below.addItem(sample.item, label.text)
        inside.setVisible(False)
        widget.addItem(below, row=1, col=0)
    widget.resize(*size)
    widget.show()
    app.processEvents()
    widget.grab()  # the first paint sizes the axes to their tick labels; the picture is the second
    app.processEvents()
    path = Path(path)
    if not widget.grab().save(str(path), "PNG"):
        raise OSError(f"{path}: could not write the image")
    widget.close()
    widget.deleteLater()
    app.processEvents()
    return path


def render_analysis_pngs(result: Any, out_dir: str | Path, *, density: float | None = None,
                         size: tuple[int, int] = DEFAULT_SIZE, style: PlotStyle = LIGHT) -> list[Path]:
    """Every figure of an AnalysisResult, AlignmentResult or RecipeAnalysis as PNG files in `out_dir`.

    `density` marks the trim density (default: the recipe's, else 0.2).
    Returns the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    interference, alignments = result, []
    if hasattr(result, "interference"):  # RecipeAnalysis
        interference, alignments = result.interference, list(result.alignments)
        if density is None:
            density = result.density
    elif hasattr(result, "cosine_before"):  # AlignmentResult
        interference, alignments = None, [result]
    density = 0.2 if density is None else float(density)
    figures: list[tuple[str, Any]] = []
    if interference is not None:
        figures += [
            ("cosine.png", lambda: cosine_heatmap(interference, style=style)),
            ("cosine_layers.png", lambda: cosine_per_layer_plot(interference, style)),
            ("norms.png", lambda: norms_plot(interference, style)),
            ("sign_conflict_density.png", lambda: sign_conflict_vs_density(interference, density, style)),
            ("sign_conflict_layers.png", lambda: sign_conflict_per_layer(interference, density, style)),
            ("magnitudes.png", lambda: magnitude_histogram_plot(interference, density, style=style)),
            ("pcb_scores.png", lambda: pcb_score_plot(interference, style)),
            ("pcb_kept.png", lambda: pcb_kept_plot(interference, style)),
        ]
        if interference.has_retention:
            figures.append(("retention.png", lambda: retention_plot(interference, style)))
    for k, al in enumerate(alignments):
        name = "alignment.png" if len(alignments) == 1 else f"alignment_{k + 1}.png"
        figures.append((name, lambda al=al: alignment_plot(al, style)))
    written = []
    for name, make in figures:
        shape = (min(size[0], 860), size[1]) if name == "cosine.png" else size  # a square map needs less width
        written.append(render_png(make(), out / name, shape, style))
    return written
