"""The method panel: method picker, its parameters, per-layer overrides and curves, run options.

Every widget is built from the engine's method registry (`merging.methods`),
so the list of methods, their parameters, defaults, bounds and tooltips are the
engine's. The panel edits one `workspace.MergeSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QScrollArea,
    QSpinBox,
    QStackedWidget,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .overrides_editor import OverridesEditor
from .param_widgets import ParamEditor
from .workspace import AlignmentSettings, MergeSettings, ModelEntry, switch_method

SAME_DTYPE = "same as inputs"
OUT_DTYPES = (SAME_DTYPE, "float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("float32", "float64")
BUILTIN_SPECS = ("mlp", "resnet", "vit", "gpt2")
SPEC_FILE = "spec file…"
DEFAULT_SHARD = "5GB"

OPTION_TIPS = {
    "seed": "Seed for every random step (DARE's drop masks, the order of alignment rounds). "
    "The same seed gives the same merge, on CPU or GPU.",
    "device": "Where the merge math runs. auto: the CUDA GPU when there is one, else the CPU. "
    "Memory use stays at a few tensors either way.",
    "backend": "Kernels for the per-parameter passes. numba: compiled CPU kernels; torch: PyTorch ops (CUDA or CPU); "
    "auto: numba on CPU, torch on a GPU. Both give the same result.",
    "dtype": "Precision of the merge arithmetic. float32 is exact enough for every method; float64 for reference runs.",
    "out_dtype": "Dtype of the written floating-point tensors. 'same as inputs' keeps each tensor's own dtype; "
    "bfloat16/float16 halve the size. Integer buffers are always copied unchanged.",
    "shard_size": "Largest safetensors file written; bigger models are split into shards with an index "
    "(Hugging Face layout). Examples: 5GB, 500MB, 2GiB.",
    "license": "License written into the model card's front matter (e.g. apache-2.0, mit). Blank: none.",
}


def _combo(items: tuple[str, ...], tip: str) -> QComboBox:
    combo = QComboBox()
    combo.addItems(list(items))
    combo.setToolTip(tip)
    return combo


class MethodPanel(QWidget):
    changed = Signal(str)  # what changed: "method", "param:<name>", "options", "overrides", "alignment"

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.settings = MergeSettings()
        self.editors: dict[str, ParamEditor] = {}
        self.models: list[ModelEntry] = []
        self._loading = False
        self._ready = False
        self.curve = None  # CurveEditor, once pyqtgraph is loaded

        outer = QVBoxLayout(self)
        outer.setContentsMargins(6, 6, 6, 6)
        self.stack = QStackedWidget()
        outer.addWidget(self.stack)

        # page 0: the engine is still loading (torch, numba) in the background
        loading = QWidget()
        ll = QVBoxLayout(loading)
        ll.addStretch(1)
        msg = QLabel("Loading the merge engine…")
        msg.setAlignment(Qt.AlignmentFlag.AlignCenter)
        msg.setObjectName("Muted")
        bar = QProgressBar()
        bar.setRange(0, 0)
        bar.setMaximumWidth(220)
        bar.setTextVisible(False)
        ll.addWidget(msg)
        ll.addWidget(bar, 0, Qt.AlignmentFlag.AlignHCenter)
        ll.addStretch(1)
        self.stack.addWidget(loading)

        # page 1: the panel
        page = QWidget()
        pl = QVBoxLayout(page)
        pl.setContentsMargins(0, 0, 0, 0)
        head = QHBoxLayout()
        title = QLabel("Method")
        title.setObjectName("PanelTitle")
        head.addWidget(title)
        self.method_combo = QComboBox()
        self.method_combo.setObjectName("MethodCombo")
        self.method_combo.setMinimumWidth(200)
        self.method_combo.currentIndexChanged.connect(self._method_chosen)
        head.addWidget(self.method_combo, 1)
        pl.addLayout(head)
        self.summary = QLabel()
        self.summary.setObjectName("MethodSummary")
        self.summary.setWordWrap(True)
        pl.addWidget(self.summary)
        self.base_hint = QLabel()
        self.base_hint.setObjectName("ErrorText")
        self.base_hint.setWordWrap(True)
        self.base_hint.hide()
        pl.addWidget(self.base_hint)

        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        pl.addWidget(self.tabs, 1)
        self.stack.addWidget(page)

        # Parameters tab
        params_page = QWidget()
        self.params_layout = QVBoxLayout(params_page)
        self.params_layout.setContentsMargins(4, 6, 4, 4)
        self.form_host = QWidget()
        self.form = QFormLayout(self.form_host)
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.params_layout.addWidget(self.form_host)
        self.alignment_box = self._build_alignment_box()
        self.params_layout.addWidget(self.alignment_box)
        self.params_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(params_page)
        self.tabs.addTab(scroll, "Parameters")

        # Per-layer rules and the layer curve
        self.overrides = OverridesEditor()
        self.overrides.changed.connect(self._overrides_edited)
        rules_page = QWidget()
        QVBoxLayout(rules_page).addWidget(self.overrides)
        self.tabs.addTab(rules_page, "Overrides")
        self.tabs.setTabToolTip(1, "Per-tensor and per-layer rules: other values for tensors matching a regex or a layer range")
        self.curve_host = QWidget()
        QVBoxLayout(self.curve_host).setContentsMargins(4, 6, 4, 4)
        self.tabs.addTab(self.curve_host, "Layer curve")
        self.tabs.setTabToolTip(2, "One parameter as a curve across the model's depth (mergekit's gradient values)")

        # Options tab
        self.tabs.addTab(self._build_options(), "Options")
        self.tabs.setTabToolTip(3, "Seed, device, backend, dtypes, shard size and license")

    # -- building -------------------------------------------------------------------------------
    def _build_alignment_box(self) -> QGroupBox:
        box = QGroupBox("Align models first (permutation alignment, Git Re-Basin)")
        box.setCheckable(True)
        box.setChecked(False)
        box.setToolTip(
            "For models trained from different random starts (no shared base): permute each model's hidden units "
            "to match the reference before merging, so averaging does not destroy them. "
            "Usually followed by Linear."
        )
        form = QFormLayout(box)
        self.spec_combo = _combo(BUILTIN_SPECS + (SPEC_FILE,), "Architecture rules for which axes may be permuted "
                                 "(mlp, resnet, vit, gpt2) or a spec file (YAML/JSON).")
        self.spec_path = ""
        self.reference_combo = QComboBox()
        self.reference_combo.setToolTip("The model the others are aligned to (default: the first fine-tuned model).")
        self.rounds = QSpinBox()
        self.rounds.setRange(1, 10000)
        self.rounds.setValue(100)
        self.rounds.setToolTip("Weight matching stops when no group improves, or after this many rounds.")
        form.addRow("Spec", self.spec_combo)
        form.addRow("Reference", self.reference_combo)
        form.addRow("Max rounds", self.rounds)
        box.toggled.connect(self._alignment_edited)
        self.spec_combo.activated.connect(self._spec_chosen)
        self.reference_combo.activated.connect(self._alignment_edited)
        self.rounds.valueChanged.connect(self._alignment_edited)
        return box

    def _build_options(self) -> QWidget:
        from merging.progress import CancelToken  # noqa: F401 - light; checks the engine package is importable

        page = QWidget()
        form = QFormLayout(page)
        form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setToolTip(OPTION_TIPS["seed"])
        self.device = _combo(("auto", "cpu", "cuda"), OPTION_TIPS["device"])
        self.backend = _combo(("auto", "numba", "torch"), OPTION_TIPS["backend"])
        self.compute_dtype = _combo(COMPUTE_DTYPES, OPTION_TIPS["dtype"])
        self.out_dtype = _combo(OUT_DTYPES, OPTION_TIPS["out_dtype"])
        self.shard = QLineEdit(DEFAULT_SHARD)
        self.shard.setToolTip(OPTION_TIPS["shard_size"])
        self.license = QLineEdit()
        self.license.setPlaceholderText("e.g. apache-2.0")
        self.license.setToolTip(OPTION_TIPS["license"])
        for label, widget, key in (
            ("Seed", self.seed, "seed"),
            ("Device", self.device, "device"),
            ("Backend", self.backend, "backend"),
            ("Compute dtype", self.compute_dtype, "dtype"),
            ("Output dtype", self.out_dtype, "out_dtype"),
            ("Shard size", self.shard, "shard_size"),
            ("License", self.license, "license"),
        ):
            lab = QLabel(label)
            lab.setToolTip(OPTION_TIPS[key])
            form.addRow(lab, widget)
        self.seed.valueChanged.connect(self._options_edited)
        for combo in (self.device, self.backend, self.compute_dtype, self.out_dtype):
            combo.currentIndexChanged.connect(self._options_edited)
        self.shard.editingFinished.connect(self._options_edited)
        return page

    def engine_ready(self) -> None:
        """Fill the method list from the registry (called once `merging` is imported)."""
        from merging.methods import get_method, method_names

        from .curve_editor import CurveEditor

        self._loading = True
        self.method_combo.clear()
        for name in method_names():
            m = get_method(name)
            self.method_combo.addItem(m.title or name, name)
            self.method_combo.setItemData(self.method_combo.count() - 1, m.summary, Qt.ItemDataRole.ToolTipRole)
        self._loading = False
        self.curve = CurveEditor()
        self.curve.changed.connect(self._curve_edited)
        self.curve_host.layout().addWidget(self.curve)
        self._ready = True
        self.stack.setCurrentIndex(1)
        if self.settings.method not in method_names():
            self.settings.method = method_names()[0]
        self.load(self.settings)

    @property
    def ready(self) -> bool:
        return self._ready

    # -- state in and out -------------------------------------------------------------------------
    def load(self, settings: MergeSettings) -> None:
        """Show `settings` (from a recipe or a reset) in every widget."""
        self.settings = settings
        if not self._ready:
            return
        self._loading = True
        try:
            idx = self.method_combo.findData(settings.method)
            if idx < 0:
                from merging.errors import RecipeError

                raise RecipeError("merge_method", f"unknown method '{settings.method}'")
            self.method_combo.setCurrentIndex(idx)
            self._build_param_form()
            self.seed.setValue(int(settings.seed))
            self.device.setCurrentText(settings.device)
            self.backend.setCurrentText(settings.backend)
            if self.compute_dtype.findText(settings.dtype) < 0:
                self.compute_dtype.addItem(settings.dtype)
            self.compute_dtype.setCurrentText(settings.dtype)
            out = settings.out_dtype or SAME_DTYPE
            if self.out_dtype.findText(out) < 0:
                self.out_dtype.addItem(out)
            self.out_dtype.setCurrentText(out)
            a = settings.alignment
            self.alignment_box.setChecked(a is not None)
            if a is not None:
                if a.spec in BUILTIN_SPECS:
                    self.spec_combo.setCurrentText(a.spec)
                else:
                    self.spec_path = a.spec
                    self.spec_combo.setCurrentText(SPEC_FILE)
                    self.spec_combo.setToolTip(f"Spec file: {a.spec}")
                self.rounds.setValue(a.max_rounds)
            self._fill_references()
        finally:
            self._loading = False

    def _build_param_form(self) -> None:
        from merging.methods import get_method

        method = get_method(self.settings.method)
        self.summary.setText(method.summary)
        while self.form.rowCount():
            self.form.removeRow(0)
        self.editors = {}
        shown = [p for p in method.params if p.name != "weight"]
        for p in shown:
            editor = ParamEditor(p, self.form_host)
            editor.set_value(self._value_of(p))
            editor.changed.connect(self._param_edited)
            label = QLabel(p.name)
            label.setToolTip(editor.editor.toolTip())
            self.form.addRow(label, editor.widget)
            self.editors[p.name] = editor
        if not shown:
            self.form.addRow(QLabel("This method has no parameters besides the per-model weights."))
        self.overrides.set_params(list(method.params))
        self.overrides.set_overrides(self.settings.overrides)
        if self.curve is not None:
            self.curve.set_params(list(method.params), self.settings.parameters)

    def _value_of(self, p: Any) -> Any:
        params = self.settings.parameters
        if p.name in params:
            return params[p.name]
        for alias in p.aliases:
            if alias in params:
                return params[alias]
        return None

    def set_models(self, entries: list[ModelEntry], *, needs_base_missing: bool | None = None) -> None:
        self.models = entries
        self._fill_references()
        if self.curve is not None:
            counts = [e.layer_count for e in entries if e.layer_count]
            self.curve.set_layer_count(max(counts) if counts else None)

    def set_base_warning(self, text: str | None) -> None:
        self.base_hint.setText(text or "")
        self.base_hint.setVisible(bool(text))

    def _fill_references(self) -> None:
        current = self.settings.alignment.reference if self.settings.alignment else None
        self.reference_combo.blockSignals(True)
        self.reference_combo.clear()
        self.reference_combo.addItem("first model", None)
        for e in self.models:
            self.reference_combo.addItem(e.name, str(e.path))
        if current is not None:
            idx = self.reference_combo.findData(str(current))
            if idx < 0:
                self.reference_combo.addItem(Path(current).name, str(current))
                idx = self.reference_combo.count() - 1
            self.reference_combo.setCurrentIndex(idx)
        self.reference_combo.blockSignals(False)

    def shard_size(self) -> int:
        """Bytes per shard from the Options tab; ValueError says what is wrong."""
        from merging.export import parse_size

        return parse_size(self.shard.text().strip() or DEFAULT_SHARD)

    def license_text(self) -> str | None:
        text = self.license.text().strip()
        return text or None

    def problems(self) -> list[str]:
        """What would stop a merge that the engine cannot see (cells that did not parse)."""
        out = list(self.overrides.has_errors())
        try:
            self.shard_size()
        except ValueError as exc:
            out.append(f"shard size: {exc}")
        return out

    # -- edits ---------------------------------------------------------------------------------------
    def _method_chosen(self, index: int) -> None:
        if self._loading or index < 0:
            return
        name = self.method_combo.itemData(index)
        if not name or name == self.settings.method:
            return
        switch_method(self.settings, name)
        self._loading = True
        try:
            self._build_param_form()
        finally:
            self._loading = False
        self.changed.emit("method")

    def _param_edited(self, name: str, value: Any) -> None:
        params = self.settings.parameters
        from merging.methods import get_method

        p = get_method(self.settings.method).param(name)
        for alias in p.aliases:
            params.pop(alias, None)
        if value is None:
            params.pop(name, None)
        else:
            params[name] = value
        if self.curve is not None:
            self.curve.set_params(list(get_method(self.settings.method).params), params)
        self.changed.emit(f"param:{name}")

    def _curve_edited(self, name: str, anchors: Any) -> None:
        params = self.settings.parameters
        if anchors is None:
            params.pop(name, None)
        else:
            params[name] = list(anchors)
        editor = self.editors.get(name)
        if editor is not None:
            editor.set_value(params.get(name))
        self.changed.emit(f"param:{name}")

    def _overrides_edited(self) -> None:
        self.settings.overrides = self.overrides.overrides()
        self.changed.emit("overrides")

    def _options_edited(self, *args) -> None:
        if self._loading:
            return
        s = self.settings
        s.seed = int(self.seed.value())
        s.device = self.device.currentText()
        s.backend = self.backend.currentText()
        s.dtype = self.compute_dtype.currentText()
        out = self.out_dtype.currentText()
        s.out_dtype = None if out == SAME_DTYPE else out
        self.changed.emit("options")

    def _spec_chosen(self, index: int) -> None:
        if self.spec_combo.currentText() == SPEC_FILE:
            path, _ = QFileDialog.getOpenFileName(self, "Permutation spec file", "", "Spec files (*.yaml *.yml *.json)")
            if not path:
                self.spec_combo.setCurrentText(BUILTIN_SPECS[0])
            else:
                self.spec_path = path
                self.spec_combo.setToolTip(f"Spec file: {path}")
        self._alignment_edited()

    def _alignment_edited(self, *args) -> None:
        if self._loading:
            return
        if not self.alignment_box.isChecked():
            self.settings.alignment = None
        else:
            spec = self.spec_combo.currentText()
            if spec == SPEC_FILE:
                spec = self.spec_path
            ref = self.reference_combo.currentData()
            old = self.settings.alignment
            self.settings.alignment = AlignmentSettings(
                spec=spec,
                reference=None if ref is None else Path(ref),
                seed=old.seed if old is not None else None,
                max_rounds=int(self.rounds.value()),
            )
        self.changed.emit("alignment")
