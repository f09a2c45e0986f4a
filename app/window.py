"""The main window: checkpoint table on top, method panel and preview below, merge bar at the bottom.

The window owns no merge logic: it keeps the rows and settings
(`workspace`), turns them into the engine's `Recipe`, and runs engine calls
(`jobs`) in workers. Heavy modules (torch, numba, pyqtgraph) are imported
after the first paint by a background job; until then the window is usable
for dropping files and the method panel says it is loading.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import QTimer, Qt, Signal
from PySide6.QtGui import QAction, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QSplitter,
    QStackedWidget,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from .checkpoint_table import CheckpointTableModel, CheckpointView
from .merge_panel import MergePanel, output_suggestion
from .method_panel import MethodPanel
from .preview import DENSITY_PARAMS, GETTING_STARTED, PreviewPanel
from .resources import app_icon, icon_size, refresh_icons, set_icon
from .settings import AppSettings
from .widgets import DropZone, MessageBanner, accept_file_drag, local_paths
from .workers import Job
from .workspace import (
    ROLE_BASE,
    STATUS_ERROR,
    STATUS_LOADING,
    AlignmentSettings,
    MergeSettings,
    ModelEntry,
    apply_base_guess,
    build_recipe,
    from_recipe,
    is_recipe_file,
)

log = logging.getLogger("alloy.app")

APP_NAME = "Alloy"
PREVIEW_DELAY_MS = 300


class MainWindow(QMainWindow):
    engine_loaded = Signal()
    merge_finished = Signal(object)  # MergeResult
    merge_failed = Signal(str)
    merge_cancelled = Signal()
    after_merge_done = Signal(object)  # jobs.AfterMerge: retention and demo scores
    entries_changed = Signal()

    def __init__(self, settings: AppSettings | None = None, *, demo_root: Path | None = None,
                 load_engine: bool = True, theme: Any = None):
        super().__init__()
        self.settings = settings if settings is not None else AppSettings()
        self.demo_root = demo_root
        self.theme = theme
        self.engine_ready = False
        self.recipe_path: Path | None = None
        self.dirty = False
        self.jobs: set[Job] = set()
        self.merge_job: Job | None = None
        self.after_job: Job | None = None
        self.last_result: Any = None
        self._pending: list[Callable[[], None]] = []
        self._inspect_bases: dict[int, Path | None] = {}
        self.created_at = time.perf_counter()

        self.setWindowTitle(APP_NAME)
        self.setWindowIcon(app_icon())
        self.setAcceptDrops(True)
        self.setMinimumSize(780, 560)
        self._build_actions()
        self._build_ui()
        self._build_menus()
        self._restore_state()
        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(PREVIEW_DELAY_MS)
        self._preview_timer.timeout.connect(self.refresh_preview)
        self._update_actions()
        if theme is not None:
            theme.changed.connect(self._theme_changed)
        if load_engine:
            QTimer.singleShot(0, self.start_engine)

    # == construction ===================================================================================
    def _action(self, name: str, text: str, slot: Callable, shortcut: Any = None, icon_name: str | None = None,
                tip: str | None = None) -> QAction:
        action = QAction(text, self)
        action.setObjectName(name)
        if icon_name:
            set_icon(action, icon_name)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setToolTip(tip)
            action.setStatusTip(tip)
        action.triggered.connect(lambda _checked=False: slot())
        self.actions_by_name[name] = action
        return action

    def _build_actions(self) -> None:
        self.actions_by_name: dict[str, QAction] = {}
        K = QKeySequence.StandardKey
        self._action("add_files", "Add checkpoints…", self.add_files_dialog, "Ctrl+Shift+O", "add",
                     "Add checkpoint files (safetensors, .bin, .pt)")
        self._action("add_folder", "Add folder…", self.add_folder_dialog, "Ctrl+Shift+F", "folder",
                     "Add a model folder (Hugging Face folder, sharded checkpoint or LoRA adapter)")
        self._action("open_recipe", "Open recipe…", self.open_recipe_dialog, K.Open, "open", "Open a recipe (YAML)")
        self._action("save_recipe", "Save recipe", self.save_recipe, K.Save, "save", "Save the recipe (YAML, runs with `alloy merge`)")
        self._action("save_recipe_as", "Save recipe as…", self.save_recipe_as, "Ctrl+Shift+S", None, "Save the recipe under a new name")
        self._action("open_demo", "Open demo", self.open_demo, "Ctrl+D", "demo",
                     "Three small digit classifiers fine-tuned from one base, with a TIES recipe")
        self._action("open_alignment_demo", "Open alignment demo", self.open_alignment_demo, None, None,
                     "Two MLPs trained from different seeds, aligned and averaged")
        self._action("merge", "Merge", self.start_merge, "Ctrl+Return", "merge", "Run the merge (Ctrl+Return)")
        self._action("cancel", "Cancel", self.cancel_merge, "Esc", "cancel", "Stop the running merge; nothing is left behind (Esc)")
        self._action("export", "Export…", self.export_dialog, "Ctrl+E", "export", "Write the merged model with another dtype or shard size")
        self._action("export_hub", "Export to Hub…", self.hub_dialog, "Ctrl+Shift+E", "hub", "Push the merged model to the Hugging Face Hub")
        self._action("remove", "Remove selected", self.remove_selected, K.Delete, "remove", "Remove the selected checkpoints")
        self._action("clear", "Clear all", self.clear_all, None, None, "Remove every checkpoint and reset the method")
        self._action("refresh_preview", "Refresh preview", self.refresh_preview, K.Refresh, None, "Compute the preview again (F5)")
        self._action("quit", "Quit", self.close, "Ctrl+Q", None, "Quit Alloy")
        self.actions_by_name["remove"].setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        self.actions_by_name["cancel"].setShortcutContext(Qt.ShortcutContext.WindowShortcut)

    def _build_ui(self) -> None:
        toolbar = QToolBar("Main")
        toolbar.setObjectName("MainToolbar")
        toolbar.setMovable(False)
        toolbar.setIconSize(icon_size())
        toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        for name in ("add_files", "add_folder", None, "open_recipe", "save_recipe", None, "open_demo", None,
                     "merge", "cancel", None, "export", "export_hub"):
            if name is None:
                toolbar.addSeparator()
            else:
                toolbar.addAction(self.actions_by_name[name])
        self.addToolBar(toolbar)
        self.toolbar = toolbar

        # checkpoints: banner + (drop zone | table)
        top = QWidget()
        tl = QVBoxLayout(top)
        tl.setContentsMargins(8, 6, 8, 2)
        tl.setSpacing(4)
        head = QHBoxLayout()
        title = QLabel("Checkpoints")
        title.setObjectName("PanelTitle")
        head.addWidget(title)
        self.table_hint = QLabel()
        self.table_hint.setObjectName("Muted")
        head.addWidget(self.table_hint, 1)
        tl.addLayout(head)
        self.banner = MessageBanner()
        tl.addWidget(self.banner)
        self.table_stack = QStackedWidget()
        self.drop_zone = DropZone()
        self.drop_zone.paths_dropped.connect(self.add_paths)
        self.drop_zone.add_files.connect(self.add_files_dialog)
        self.drop_zone.add_folder.connect(self.add_folder_dialog)
        self.drop_zone.open_demo.connect(self.open_demo)
        self.table_model = CheckpointTableModel(self)
        self.table_model.edited.connect(self._table_edited)
        self.table = CheckpointView(self.table_model)
        self.table.setObjectName("CheckpointTable")
        self.table.paths_dropped.connect(self.add_paths)
        self.table.remove_requested.connect(self.remove_rows)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        self.table.addAction(self.actions_by_name["remove"])
        self.table_stack.addWidget(self.drop_zone)
        self.table_stack.addWidget(self.table)
        tl.addWidget(self.table_stack, 1)

        self.method_panel = MethodPanel()
        self.method_panel.setObjectName("MethodPanel")
        self.method_panel.changed.connect(self._settings_changed)
        self.preview = PreviewPanel()
        self.preview.setObjectName("PreviewPanel")
        self.lower = QSplitter(Qt.Orientation.Horizontal)
        self.lower.setObjectName("LowerSplitter")
        self.lower.addWidget(self.method_panel)
        self.lower.addWidget(self.preview)
        self.lower.setStretchFactor(0, 2)
        self.lower.setStretchFactor(1, 3)
        self.lower.setChildrenCollapsible(False)
        self.method_panel.setMinimumWidth(320)
        self.preview.setMinimumWidth(400)

        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.setObjectName("MainSplitter")
        self.splitter.addWidget(top)
        self.splitter.addWidget(self.lower)
        self.splitter.setStretchFactor(0, 0)  # extra height goes to the method panel and the plots
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setChildrenCollapsible(False)

        self.merge_panel = MergePanel()
        self.merge_panel.merge_requested.connect(self.start_merge)
        self.merge_panel.cancel_requested.connect(self.cancel_merge)
        self.merge_panel.browse_requested.connect(self.browse_output)
        self.merge_panel.open_folder_requested.connect(self.open_output_folder)
        self.merge_panel.export_requested.connect(self.export_dialog)
        self.merge_panel.hub_requested.connect(self.hub_dialog)
        self.merge_panel.output.textEdited.connect(lambda _t: self._set_output_chosen(True))
        self._output_chosen = False

        central = QWidget()
        cl = QVBoxLayout(central)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.setSpacing(0)
        cl.addWidget(self.splitter, 1)
        cl.addWidget(self.merge_panel)
        self.setCentralWidget(central)
        self.statusBar().showMessage("Loading the merge engine in the background…")

    def _build_menus(self) -> None:
        a = self.actions_by_name
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        for name in ("add_files", "add_folder"):
            file_menu.addAction(a[name])
        file_menu.addSeparator()
        file_menu.addAction(a["open_recipe"])
        self.recent_menu = QMenu("Open recent", self)
        self.recent_menu.setObjectName("RecentMenu")
        file_menu.addMenu(self.recent_menu)
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        self._fill_recent()
        file_menu.addAction(a["save_recipe"])
        file_menu.addAction(a["save_recipe_as"])
        file_menu.addSeparator()
        file_menu.addAction(a["open_demo"])
        file_menu.addAction(a["open_alignment_demo"])
        file_menu.addSeparator()
        file_menu.addAction(a["export"])
        file_menu.addAction(a["export_hub"])
        file_menu.addSeparator()
        file_menu.addAction(a["quit"])
        edit = bar.addMenu("&Edit")
        edit.addAction(a["remove"])
        edit.addAction(a["clear"])
        merge = bar.addMenu("&Merge")
        merge.addAction(a["merge"])
        merge.addAction(a["cancel"])
        merge.addSeparator()
        merge.addAction(a["refresh_preview"])
        view = bar.addMenu("&View")
        self.theme_actions = {}
        for key, text in (("system", "Follow the system"), ("light", "Light"), ("dark", "Dark")):
            act = QAction(text, self, checkable=True)
            act.triggered.connect(lambda _c=False, k=key: self.set_theme(k))
            self.theme_actions[key] = act
            view.addAction(act)
        chosen = str(self.settings.value("view/theme", "system"))
        self.theme_actions.get(chosen, self.theme_actions["system"]).setChecked(True)
        help_menu = bar.addMenu("&Help")
        help_menu.addAction("Keyboard shortcuts", self.show_shortcuts)
        help_menu.addAction("About Alloy", self.show_about)

    # == settings ==========================================================================================
    def _restore_state(self) -> None:
        geometry = self.settings.load_bytes("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(1280, 800)
        for key, splitter in (("main_splitter", self.splitter), ("lower_splitter", self.lower)):
            state = self.settings.load_bytes(key)
            if state is not None:
                splitter.restoreState(state)
        if self.settings.load_bytes("main_splitter") is None:
            self.splitter.setSizes([230, 470])
            self.lower.setSizes([470, 780])
        state = self.settings.load_bytes("state")
        if state is not None:
            self.restoreState(state)

    def save_state(self) -> None:
        self.settings.save_bytes("geometry", self.saveGeometry())
        self.settings.save_bytes("state", self.saveState())
        self.settings.save_bytes("main_splitter", self.splitter.saveState())
        self.settings.save_bytes("lower_splitter", self.lower.saveState())
        self.settings.sync()

    def set_theme(self, key: str) -> None:
        for k, act in self.theme_actions.items():
            act.setChecked(k == key)
        self.settings.set_value("view/theme", key)
        if self.theme is not None:
            self.theme.force = None if key == "system" else key
            self.theme.apply()

    def _theme_changed(self, colors: Any) -> None:
        refresh_icons()
        self.drop_zone.refresh_icons()
        self.table_model.refresh()
        self.preview.apply_theme()

    # == engine ============================================================================================
    def start_engine(self) -> None:
        from .jobs import load_engine

        job = Job(load_engine, name="engine")
        job.succeeded.connect(lambda _names: self._engine_ready())
        job.failed.connect(lambda msg: self.show_error(f"The merge engine did not load: {msg}"))
        self._run(job)

    def _engine_ready(self) -> None:
        self.engine_ready = True
        self.method_panel.engine_ready()
        self.preview.engine_ready()
        self._hub_availability()
        self.statusBar().showMessage(f"Ready (engine loaded {time.perf_counter() - self.created_at:.1f} s after start)", 6000)
        self._update_actions()
        pending, self._pending = self._pending, []
        for fn in pending:
            fn()
        self.engine_loaded.emit()
        self._entries_updated()
        from .jobs import warm_kernels

        self._run(Job(warm_kernels, name="kernel warm-up"))  # numba JIT off the first merge's clock

    def _when_ready(self, fn: Callable[[], None]) -> None:
        if self.engine_ready:
            fn()
        else:
            self._pending.append(fn)

    def _hub_availability(self) -> None:
        try:
            import importlib.util

            available = importlib.util.find_spec("merging.hub") is not None
        except (ImportError, ValueError):
            available = False
        reason = "" if available else "Export to Hub needs the Hub module (merging.hub), which is not installed"
        self.hub_available = available
        self.merge_panel.set_hub_available(available, reason)
        self.actions_by_name["export_hub"].setToolTip(reason or "Push the merged model to the Hugging Face Hub")

    def _run(self, job: Job) -> Job:
        """Start a job and keep it alive until it finishes."""
        self.jobs.add(job)
        job.finished.connect(lambda j=job: self.jobs.discard(j))
        job.start()
        return job

    # == checkpoints ==========================================================================================
    @property
    def entries(self) -> list[ModelEntry]:
        return self.table_model.entries

    def add_files_dialog(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(
            self, "Add checkpoints", self.settings.last_folder("checkpoints"),
            "Checkpoints (*.safetensors *.bin *.pt *.pth *.ckpt *.json);;All files (*)",
        )
        if files:
            self.settings.set_last_folder("checkpoints", files[0])
            self.add_paths([Path(f) for f in files])

    def add_folder_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a model folder", self.settings.last_folder("checkpoints"))
        if folder:
            self.settings.set_last_folder("checkpoints", folder)
            self.add_paths([Path(folder)])

    def add_paths(self, paths: list[Path]) -> None:
        """Files and folders from a drop or a dialog: checkpoints go to the table, a recipe is opened."""
        refused = []
        for raw in paths:
            path = Path(raw)
            if is_recipe_file(path):
                self.open_recipe(path)
                continue
            if not path.exists():
                refused.append(f"{path}: no such file or folder")
                continue
            if self.table_model.contains_path(path):
                self.banner.show_message(f"{path.name} is already in the table.", "info", 5000)
                continue
            self._add_entry(ModelEntry(path=path))
        if refused:
            self.banner.show_message("\n".join(refused), "error")
        self._entries_updated()

    def _add_entry(self, entry: ModelEntry) -> None:
        self.table_model.add(entry)
        self._inspect(entry)

    def _base_path(self) -> Path | None:
        base = next((e for e in self.entries if e.role == ROLE_BASE), None)
        return base.path if base is not None and base.status != STATUS_ERROR else None

    def _inspect(self, entry: ModelEntry) -> None:
        from .jobs import inspect_job

        base = entry.lora_base or self._base_path()
        self._inspect_bases[id(entry)] = base
        entry.status = STATUS_LOADING
        job = Job(inspect_job(entry.path, base), name=f"reading {entry.path.name}")
        job.succeeded.connect(lambda result, e=entry: self._inspected(e, result))
        job.failed.connect(lambda msg, e=entry: self._inspect_failed(e, msg))
        self._run(job)

    def _inspected(self, placeholder: ModelEntry, result: Any) -> None:
        row = self.table_model.row_of(placeholder)
        if row < 0:
            return  # removed meanwhile
        if isinstance(result, list):  # a folder of model folders
            self.table_model.remove_rows([row])
            self.banner.show_message(f"Added the {len(result)} model folders inside {placeholder.path.name}.", "info", 6000)
            self.add_paths(result)
            return
        self._inspect_bases[id(result)] = self._inspect_bases.pop(id(placeholder), None)
        self.table_model.replace(placeholder, result)
        self._after_inspection()

    def _inspect_failed(self, placeholder: ModelEntry, message: str) -> None:
        from .workspace import not_a_checkpoint_message

        row = self.table_model.row_of(placeholder)
        if row < 0:
            return
        if "not a checkpoint" in message:
            self.table_model.remove_rows([row])
            self.banner.show_message(f"Not added — {message}", "error")
            self.statusBar().showMessage(f"Refused {placeholder.path.name}: not a checkpoint", 6000)
        else:
            placeholder.status = STATUS_ERROR
            placeholder.error = message or not_a_checkpoint_message(placeholder.path)
            self.table_model.replace(placeholder, placeholder)
        self._after_inspection()

    def _after_inspection(self) -> None:
        if not any(e.status == STATUS_LOADING for e in self.entries):
            apply_base_guess(self.entries)
            self.table_model.refresh()
            self._reinspect_adapters()
        self._entries_updated()

    def _reinspect_adapters(self) -> None:
        """Adapters need their base: read them again when the base they were read with has changed."""
        base = self._base_path()
        for e in list(self.entries):
            if not e.is_adapter or e.status == STATUS_LOADING:
                continue
            used = self._inspect_bases.get(id(e))
            wanted = e.lora_base or base
            if wanted is not None and used != wanted:
                self._inspect(e)
                self.table_model.refresh()

    def _table_edited(self) -> None:
        self._reinspect_adapters()
        self.mark_dirty()
        self._entries_updated()

    def remove_selected(self) -> None:
        self.remove_rows(self.table.selected_rows())

    def remove_rows(self, rows: list[int]) -> None:
        if self.merge_running:
            return
        self.table_model.remove_rows(rows)
        self.mark_dirty()
        self._entries_updated()

    def clear_all(self) -> None:
        if self.merge_running:
            return
        self.table_model.set_entries([])
        self.recipe_path = None
        self.method_panel.load(MergeSettings(method=self.method_panel.settings.method))
        self.dirty = False
        self._entries_updated()

    def _entries_updated(self) -> None:
        entries = self.entries
        self.table_stack.setCurrentIndex(1 if entries else 0)
        ready = [e for e in entries if e.ready]
        errors = [e for e in entries if e.status == STATUS_ERROR]
        loading = [e for e in entries if e.status == STATUS_LOADING]
        bits = []
        if entries:
            bits.append(f"{len(entries)} model{'s' if len(entries) != 1 else ''}")
        if loading:
            bits.append(f"{len(loading)} reading…")
        if errors:
            bits.append(f"{len(errors)} with errors")
        if entries and not loading:
            base = next((e for e in entries if e.role == ROLE_BASE), None)
            bits.append(f"base: {base.name}" if base else "no base marked")
        self.table_hint.setText(" · ".join(bits) + ("  —  drop more files, double-click Role or Weight to edit" if entries else ""))
        self.method_panel.set_models(ready)
        self._update_base_warning()
        self.table_model.weight_default = self._weight_default()
        self.entries_changed.emit()
        self._update_actions()
        self._update_title()
        self.schedule_preview()

    def _weight_default(self) -> float | None:
        if not self.engine_ready:
            return 1.0
        from merging.methods import get_method

        try:
            p = get_method(self.method_panel.settings.method).param("weight")
        except KeyError:
            return None
        self.table_model.weight_help = p.help or self.table_model.weight_help
        return float(p.default)

    def _update_base_warning(self) -> None:
        if not self.engine_ready:
            return
        from merging.methods import get_method

        method = get_method(self.method_panel.settings.method)
        has_base = any(e.role == ROLE_BASE for e in self.entries)
        if method.needs_base and self.entries and not has_base:
            self.method_panel.set_base_warning(f"{method.title} needs a base model: set one row's Role to 'base'.")
        else:
            self.method_panel.set_base_warning(None)

    # == settings and preview ===================================================================================
    def _settings_changed(self, what: str) -> None:
        self.mark_dirty()
        if what == "method":
            self.table_model.weight_default = self._weight_default()
            self.table_model.refresh()
            self._update_base_warning()
        density_key = DENSITY_PARAMS.get(self.method_panel.settings.method)
        if what == f"param:{density_key}":
            value = self.method_panel.settings.parameters.get(density_key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
                self.preview.set_density(float(value))
        self.schedule_preview()

    def schedule_preview(self) -> None:
        self._preview_timer.start()

    def current_recipe(self, *, validate: bool = True) -> Any:
        """The engine's Recipe for what the window shows (RecipeError says what is missing)."""
        return build_recipe(self.entries, self.method_panel.settings, validate=validate)

    def refresh_preview(self) -> None:
        if not self.engine_ready:
            return
        if self.merge_running:
            self.schedule_preview()  # the inputs are locked while merging; look again afterwards
            return
        entries = self.entries
        ready = [e for e in entries if e.ready]
        if any(e.status == STATUS_LOADING for e in entries):
            return  # the last inspection schedules another refresh
        if any(e.status == STATUS_ERROR for e in entries):
            self.preview.clear("Remove or fix the rows with errors to see the preview.")
            return
        settings = self.method_panel.settings
        has_base = any(e.role == ROLE_BASE for e in ready)
        finetuned = [e for e in ready if e.role != ROLE_BASE]
        if settings.alignment is None and (not has_base or len(finetuned) < 1):
            if not entries:
                self.preview.clear(GETTING_STARTED, rich=True)
            else:
                self.preview.clear("Add a base model and two or more fine-tuned models (mark the base in the Role column) "
                                   "to see how their changes interfere.")
            return
        if settings.alignment is not None and len(finetuned) < 2:
            self.preview.clear("Alignment needs two or more models.")
            return
        if self.method_panel.problems():
            self.preview.clear("Fix the highlighted settings to see the preview: " + "; ".join(self.method_panel.problems()))
            return
        from merging.errors import AlloyError

        try:
            recipe = self.current_recipe()
        except AlloyError as exc:
            self.preview.clear(f"No preview: {exc}")
            return
        self.preview.request(recipe)

    # == recipes ===============================================================================================
    def mark_dirty(self) -> None:
        self.dirty = True
        self._update_title()

    def _update_title(self) -> None:
        name = self.recipe_path.name if self.recipe_path else ("untitled recipe" if self.entries else "")
        title = f"{name}{' •' if self.dirty and name else ''} — {APP_NAME}" if name else APP_NAME
        self.setWindowTitle(title)

    def open_recipe_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open recipe", self.settings.last_folder("recipes"),
                                              "Recipes (*.yaml *.yml);;All files (*)")
        if path:
            self.open_recipe(Path(path))

    def open_recipe(self, path: Path) -> None:
        self._when_ready(lambda: self._open_recipe_now(Path(path)))

    def _open_recipe_now(self, path: Path) -> None:
        from merging.errors import AlloyError
        from merging.recipe import load_recipe

        if self.merge_running:
            self.banner.show_message("A merge is running; cancel it before opening a recipe.", "warning", 6000)
            return
        try:
            recipe = load_recipe(path)
        except AlloyError as exc:
            self.show_error(str(exc))
            return
        self.load_recipe_object(recipe)
        self.recipe_path = path
        self.dirty = False
        self.settings.add_recent_recipe(path)
        self.settings.set_last_folder("recipes", path)
        self._update_title()
        self.banner.show_message(f"Opened {path.name}.", "info", 4000)

    def load_recipe_object(self, recipe: Any) -> None:
        """Show a Recipe: rows (read again from disk) and settings."""
        entries, settings = from_recipe(recipe)
        self.preview.clear("Reading the checkpoints…")
        if not self.merge_running:
            self.merge_panel.show_idle()
        self.table_model.set_entries([])
        self.method_panel.load(settings)
        for e in entries:
            self._add_entry(e)
        self.table_model.weight_default = self._weight_default()
        self._entries_updated()

    def save_recipe(self) -> bool:
        if self.recipe_path is None:
            return self.save_recipe_as()
        return self.save_recipe_to(self.recipe_path)

    def save_recipe_as(self) -> bool:
        start = str(self.recipe_path) if self.recipe_path else str(Path(self.settings.last_folder("recipes")) / "recipe.yaml")
        path, _ = QFileDialog.getSaveFileName(self, "Save recipe", start, "Recipes (*.yaml *.yml)")
        if not path:
            return False
        p = Path(path)
        if p.suffix.lower() not in (".yaml", ".yml"):
            p = p.with_suffix(".yaml")
        return self.save_recipe_to(p)

    def save_recipe_to(self, path: Path) -> bool:
        from merging.errors import AlloyError

        if not self.engine_ready:
            self.show_error("The merge engine is still loading; try again in a moment.")
            return False
        try:
            recipe = self.current_recipe()
            recipe.save(path)
        except AlloyError as exc:
            self.show_error(f"Not saved: {exc}")
            return False
        except OSError as exc:
            self.show_error(f"Not saved: {path}: {exc.strerror or exc}")
            return False
        self.recipe_path = Path(path)
        self.dirty = False
        self.settings.add_recent_recipe(path)
        self.settings.set_last_folder("recipes", path)
        self._update_title()
        self.statusBar().showMessage(f"Saved {path}", 5000)
        return True

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        recent = self.settings.recent_recipes()
        for i, p in enumerate(recent):
            act = self.recent_menu.addAction(f"&{i + 1}  {Path(p).name}", lambda p=p: self.open_recipe(Path(p)))
            act.setToolTip(p)
            act.setStatusTip(p)
        if not recent:
            act = self.recent_menu.addAction("No recent recipes")
            act.setEnabled(False)
        else:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear the list", self.settings.clear_recent_recipes)

    # == demo ===================================================================================================
    def open_demo(self, after: Callable[[Any], None] | None = None, *, open_recipe: bool = True) -> Job:
        """Build (once, about 10 s) or reuse the demo workspace, then open its TIES recipe."""
        from .jobs import demo_job

        self.banner.show_message("Preparing the demo models (trained once, about 10 s; reused afterwards)…", "info")
        self.actions_by_name["open_demo"].setEnabled(False)
        self.drop_zone.demo_button.setEnabled(False)
        job = Job(demo_job(self.demo_root), name="demo")
        job.progress.connect(lambda msg: self.banner.show_message(f"Preparing the demo models: {msg}", "info"))
        job.succeeded.connect(lambda ws: self._demo_ready(ws, after, open_recipe))
        job.failed.connect(self.show_error)
        job.finished.connect(lambda: (self.actions_by_name["open_demo"].setEnabled(True), self.drop_zone.demo_button.setEnabled(True)))
        return self._run(job)

    def _demo_ready(self, workspace: Any, after: Callable[[Any], None] | None, open_recipe: bool = True) -> None:
        self.demo_workspace = workspace
        if open_recipe:
            self.open_recipe(workspace.recipe)
            self._suggest_output(workspace.root / "outputs")
        if after is not None:
            after(workspace)

    def open_alignment_demo(self) -> Job:
        """Two MLPs from different seeds: align, then average (the loss-barrier demo)."""

        def show(ws: Any) -> None:
            self._when_ready(lambda: self._show_alignment_demo(ws))

        return self.open_demo(after=show, open_recipe=False)

    def _show_alignment_demo(self, ws: Any) -> None:
        self.demo_workspace = ws
        settings = MergeSettings(method="linear", alignment=AlignmentSettings(spec="mlp"))
        entries = [ModelEntry(path=ws.mlp_seed_a, role_chosen=True), ModelEntry(path=ws.mlp_seed_b, role_chosen=True)]
        self.preview.clear("Reading the checkpoints…")
        self.merge_panel.show_idle()
        self.table_model.set_entries([])
        self.method_panel.load(settings)
        for e in entries:
            self._add_entry(e)
        self.recipe_path = None
        self.dirty = True
        self._suggest_output(ws.root / "outputs")
        self.banner.show_message("Alignment demo: two MLPs trained from different seeds, aligned to the first, then averaged.", "info", 8000)
        self._entries_updated()

    # == merge ===================================================================================================
    @property
    def merge_running(self) -> bool:
        return self.merge_job is not None  # cleared on the GUI thread when the job has finished

    def _set_output_chosen(self, chosen: bool) -> None:
        self._output_chosen = chosen

    def _suggest_output(self, parent: Path) -> None:
        if self._output_chosen and self.merge_panel.output.text().strip():
            return
        self.merge_panel.output.setText(str(output_suggestion(None, self.method_panel.settings.method, parent)))

    def browse_output(self) -> None:
        start = self.merge_panel.output.text().strip() or self.settings.last_folder("output")
        folder = QFileDialog.getExistingDirectory(self, "Folder for the merged model (a new sub-folder is made)",
                                                  str(Path(start).parent if start else Path.home()))
        if folder:
            self.settings.set_last_folder("output", folder)
            self.merge_panel.output.setText(str(output_suggestion(None, self.method_panel.settings.method, Path(folder))))
            self._set_output_chosen(True)

    def start_merge(self, *, overwrite: bool | None = None) -> Job | None:
        from merging.errors import AlloyError

        from .jobs import merge_job

        if self.merge_running:
            return None
        if not self.engine_ready:
            self.show_error("The merge engine is still loading; try again in a moment.")
            return None
        if any(e.status == STATUS_LOADING for e in self.entries):
            self.show_error("Some checkpoints are still being read; merge when the table is complete.")
            return None
        bad = [e for e in self.entries if e.status == STATUS_ERROR]
        if bad:
            self.show_error(f"Remove or fix the checkpoints with errors first ({', '.join(e.name for e in bad)}).")
            return None
        problems = self.method_panel.problems()
        if problems:
            self.show_error("; ".join(problems))
            return None
        try:
            recipe = self.current_recipe()
            shard = self.method_panel.shard_size()
        except AlloyError as exc:
            self.show_error(str(exc))
            return None
        text = self.merge_panel.output.text().strip()
        if not text:
            base = Path(self.settings.last_folder("output"))
            text = str(output_suggestion(None, recipe.merge_method, base))
            self.merge_panel.output.setText(text)
        out = Path(text).expanduser()
        if overwrite is None:
            overwrite = False
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                answer = QMessageBox.question(
                    self, "Replace the folder?",
                    f"{out} exists and is not empty.\n\nReplace it with the merged model? The old folder is removed only "
                    "after the new one is complete.",
                    QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No,
                )
                if answer != QMessageBox.StandardButton.Yes:
                    return None
                overwrite = True
        self.settings.set_last_folder("output", out.parent if out.parent.exists() else Path.home())
        self.banner.dismiss()
        self.preview.cancel()
        job = Job(merge_job(recipe, out, shard_size=shard, license=self.method_panel.license_text(), overwrite=overwrite),
                  name="merge")
        self.merge_recipe = recipe
        job.progress.connect(self.merge_panel.show_progress)
        job.succeeded.connect(self._merge_done)
        job.failed.connect(self._merge_failed)
        job.cancelled.connect(self._merge_cancelled)
        job.finished.connect(self._merge_finished)
        self.merge_job = job
        self._run(job)
        self.merge_panel.set_running(True)
        self._set_editing_enabled(False)
        self._update_actions()
        self.statusBar().showMessage(f"Merging into {out}…")
        return job

    def cancel_merge(self) -> None:
        if self.merge_running:
            assert self.merge_job is not None
            self.merge_job.cancel()
            self.merge_panel.progress_label.setText("Cancelling… (stops after the current tensor)")
            self.merge_panel.cancel_button.setEnabled(False)

    def _merge_done(self, result: Any) -> None:
        from .jobs import after_merge_job

        self.last_result = result
        labels = [m.label for m in self.merge_recipe.models]
        self.merge_panel.show_result(result, labels)
        self.statusBar().showMessage(f"Merged into {result.output} in {result.seconds:.1f} s", 10000)
        self.after_job = Job(after_merge_job(self.merge_recipe, result.output, labels), name="retention")
        self.after_job.succeeded.connect(self._after_merge_done)
        self.after_job.failed.connect(self.merge_panel.show_after_failed)
        self._run(self.after_job)
        self.merge_finished.emit(result)

    def _after_merge_done(self, after: Any) -> None:
        self.merge_panel.show_after(after)
        self.preview.show_retention(after.analysis)
        self.after_merge_done.emit(after)

    def _merge_failed(self, message: str) -> None:
        self.merge_panel.show_idle(f"Merge failed: {message}", error=True)
        self.show_error(f"Merge failed: {message}")
        self.merge_failed.emit(message)

    def _merge_cancelled(self) -> None:
        out = self.merge_panel.output.text().strip()
        self.merge_panel.show_idle(f"Cancelled; nothing was written to {out}.")
        self.statusBar().showMessage("Merge cancelled", 6000)
        self.merge_cancelled.emit()

    def _merge_finished(self) -> None:
        self.merge_panel.set_running(False)
        self._set_editing_enabled(True)
        self.merge_job = None
        if self.last_result is not None and self.merge_panel.pages.currentIndex() == MergePanel.PAGE_DONE:
            self._set_output_chosen(False)
            self.merge_panel.output.setText(
                str(output_suggestion(None, self.method_panel.settings.method, Path(self.last_result.output).parent))
            )
        self._update_actions()

    def _set_editing_enabled(self, enabled: bool) -> None:
        """While merging, the inputs stay as they are; the preview and plots stay usable."""
        self.table.setEnabled(enabled)
        self.drop_zone.setEnabled(enabled)
        self.method_panel.setEnabled(enabled)
        for name in ("add_files", "add_folder", "open_recipe", "open_demo", "open_alignment_demo", "remove", "clear"):
            self.actions_by_name[name].setEnabled(enabled)

    def open_output_folder(self) -> None:
        from .dialogs import open_folder

        if self.last_result is not None:
            open_folder(Path(self.last_result.output))

    # == export ====================================================================================================
    def export_dialog(self) -> Any:
        from .dialogs import ExportDialog

        if self.last_result is None or not Path(self.last_result.output).is_dir():
            self.show_error("Merge first: Export writes a copy of the merged model with another dtype or shard size.")
            return None
        dialog = ExportDialog(Path(self.last_result.output), folder=self.settings.last_folder("export"),
                              shard=self.method_panel.shard.text() or "5GB", parent=self)
        dialog.exported.connect(lambda p: self.settings.set_last_folder("export", Path(p).parent))
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        self.export_window = dialog
        return dialog

    def hub_dialog(self) -> Any:
        if not getattr(self, "hub_available", False):
            self.show_error("Export to Hub needs the Hub module (merging.hub), which is not installed.")
            return None
        if self.last_result is None or not Path(self.last_result.output).is_dir():
            self.show_error("Merge first: Export to Hub pushes the merged model folder.")
            return None
        from .dialogs import HubDialog

        dialog = HubDialog(Path(self.last_result.output), license=self.method_panel.license_text(),
                           default_repo=str(self.settings.value("hub/last_repo", "") or ""), parent=self)
        dialog.pushed.connect(lambda r: self.settings.set_value("hub/last_repo", r.repo_id))
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        self.hub_window = dialog
        return dialog

    # == misc ======================================================================================================
    def _update_actions(self) -> None:
        a = self.actions_by_name
        running = self.merge_running
        ready = self.engine_ready
        a["merge"].setEnabled(ready and not running and bool(self.entries))
        a["cancel"].setEnabled(running)
        have_output = self.last_result is not None
        a["export"].setEnabled(have_output and not running)
        a["export_hub"].setEnabled(have_output and not running and getattr(self, "hub_available", False))
        a["save_recipe"].setEnabled(ready and bool(self.entries))
        a["save_recipe_as"].setEnabled(ready and bool(self.entries))
        a["refresh_preview"].setEnabled(ready)
        self.merge_panel.merge_button.setEnabled(ready and not running and bool(self.entries))

    def show_error(self, message: str) -> None:
        self.banner.show_message(message, "error")
        self.statusBar().showMessage(message.splitlines()[0][:200], 8000)

    def show_shortcuts(self) -> None:
        rows = []
        for name, action in self.actions_by_name.items():
            seq = action.shortcut().toString(QKeySequence.SequenceFormat.NativeText)
            if seq:
                rows.append(f"<tr><td>{action.text().replace('&', '')}</td><td>&nbsp;&nbsp;<b>{seq}</b></td></tr>")
        QMessageBox.information(self, "Keyboard shortcuts", f"<table>{''.join(rows)}</table>")

    def show_about(self) -> None:
        try:
            from .about import show_about
        except ImportError:
            show_about = None
        if show_about is not None:
            self.about_window = show_about(self)
            return
        from merging import __version__

        QMessageBox.about(self, "About Alloy", f"<b>Alloy {__version__}</b><br>Merge fine-tuned checkpoints: task arithmetic, "
                          "TIES, DARE, Breadcrumbs, PCB and permutation alignment.")

    # -- window-level drag and drop (anywhere on the window) -------------------------------------------------------
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if self.merge_running:
            event.ignore()
            return
        accept_file_drag(event)

    def dragMoveEvent(self, event) -> None:
        if not self.merge_running:
            accept_file_drag(event)

    def dropEvent(self, event: QDropEvent) -> None:
        paths = local_paths(event.mimeData())
        if not paths or self.merge_running:
            event.ignore()
            return
        event.accept()
        self.add_paths(paths)

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.merge_running:
            answer = QMessageBox.question(self, "Stop the merge?", "A merge is running. Stop it and quit? Nothing is left behind.",
                                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                          QMessageBox.StandardButton.No)
            if answer != QMessageBox.StandardButton.Yes:
                event.ignore()
                return
        self.save_state()
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Cancel every job and wait for the workers (so nothing writes after the window is gone)."""
        self._preview_timer.stop()
        self.preview.cancel()
        jobs = list(self.jobs)
        for job in jobs:
            job.cancel()
        deadline = time.monotonic() + timeout_s
        for job in jobs:
            job.wait(max(0.0, deadline - time.monotonic()))
        QApplication.processEvents()
