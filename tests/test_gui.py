"""The desktop window, offscreen with pytest-qt: drops, previews, merges, cancel, recipes, export, Hub."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_model
from hub_server import hf_local, hub, token  # noqa: F401 - fixtures
from safetensors.torch import load_file, save_file

from PySide6.QtCore import QMimeData, QPointF, QSettings, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDragMoveEvent, QDropEvent, QImage
from PySide6.QtWidgets import QApplication, QWidget

from app import jobs
from app.checkpoint_table import COL_FORMAT, COL_ROLE, COL_WEIGHT
from app.settings import AppSettings
from app.window import MainWindow
from app.workspace import ROLE_BASE, ROLE_FINETUNED, STATUS_ERROR, STATUS_READY
from merging.checkpoint import open_checkpoint
from merging.executor import run_merge
from merging.export import export_checkpoint
from merging.recipe import load_recipe

ENGINE_TIMEOUT_MS = 120_000
JOB_TIMEOUT_MS = 120_000


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def make_window(qtbot, tmp_path):
    made: list[MainWindow] = []

    def make(settings_file: Path | None = None, demo_root: Path | None = None) -> MainWindow:
        store = QSettings(str(settings_file or tmp_path / "settings.ini"), QSettings.Format.IniFormat)
        window = MainWindow(AppSettings(store), demo_root=demo_root)
        qtbot.addWidget(window)
        window.show()
        qtbot.waitUntil(lambda: window.engine_ready, timeout=ENGINE_TIMEOUT_MS)
        made.append(window)
        return window

    yield make
    for window in made:
        window.shutdown()


def drop(target: QWidget, paths: list[Path]) -> QDropEvent:
    """A file-manager drop: DragEnter, DragMove and Drop with file URLs, sent to `target`."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    center = QPointF(target.rect().center())
    buttons, mods = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    enter = _drag_event(QDragEnterEvent, center, mime)
    QApplication.sendEvent(target, enter)
    assert enter.isAccepted()
    move = _drag_event(QDragMoveEvent, center, mime)
    QApplication.sendEvent(target, move)
    event = QDropEvent(center, Qt.DropAction.CopyAction, mime, buttons, mods)
    QApplication.sendEvent(target, event)
    assert event.isAccepted()
    return event


def _drag_event(cls, pos: QPointF, mime: QMimeData):
    """QPointF constructors where Qt has them (6.12 deprecates the QPoint ones), QPoint before."""
    args = (Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    try:
        return cls(pos, *args)
    except TypeError:
        return cls(pos.toPoint(), *args)


def settled(window: MainWindow) -> bool:
    return bool(window.entries) and all(e.status in (STATUS_READY, STATUS_ERROR) for e in window.entries) and not any(
        e.is_adapter and e.status == STATUS_ERROR and window._base_path() is not None for e in window.entries
    )


def open_demo(qtbot, window: MainWindow) -> None:
    window.actions_by_name["open_demo"].trigger()
    qtbot.waitUntil(lambda: len(window.entries) == 4 and all(e.ready for e in window.entries), timeout=JOB_TIMEOUT_MS)
    qtbot.waitUntil(lambda: window.preview.data is not None and not window.preview.running, timeout=JOB_TIMEOUT_MS)


def small_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    shapes = {"embed.weight": (10, 4), "layers.0.weight": (4, 4), "layers.0.bias": (4,), "layers.1.weight": (4, 4), "head.weight": (3, 4)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


# -- drag and drop ---------------------------------------------------------------------------------


def test_drop_files_and_folders_on_the_table(make_window, qtbot, tmp_path):
    window = make_window()
    base = small_model()
    hf = write_model(tmp_path / "hf-model", base, {"architectures": ["MyNetForCausalLM"]})
    single = tmp_path / "single.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in base.items()}, str(single))
    pickle = tmp_path / "weights.pt"
    torch.save({k: v + 1 for k, v in base.items()}, pickle)
    ck = open_checkpoint(hf)
    sharded = export_checkpoint(ck, tmp_path / "sharded", shard_size=200)
    ck.close()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": "hf-model", "target_modules": ["layers.0"],
    }))
    g = torch.Generator().manual_seed(9)
    save_file({"base_model.model.layers.0.lora_A.weight": torch.randn(2, 4, generator=g),
               "base_model.model.layers.0.lora_B.weight": torch.randn(4, 2, generator=g)}, str(adapter / "adapter_model.safetensors"))

    # the empty window shows the drop zone; the first drop goes there
    assert window.table_stack.currentWidget() is window.drop_zone
    drop(window.drop_zone, [hf])
    qtbot.waitUntil(lambda: settled(window), timeout=JOB_TIMEOUT_MS)
    assert window.table_stack.currentWidget() is window.table
    drop(window.table.viewport(), [single, pickle, sharded, adapter])
    qtbot.waitUntil(lambda: len(window.entries) == 5 and settled(window), timeout=JOB_TIMEOUT_MS)

    rows = {e.path.name: e for e in window.entries}
    params = sum(t.numel() for t in base.values())
    assert rows["hf-model"].format == "safetensors" and rows["hf-model"].num_params == params
    assert rows["hf-model"].architecture == "MyNetForCausalLM"
    assert rows["hf-model"].size_bytes == (hf / "model.safetensors").stat().st_size
    assert rows["single.safetensors"].dtype_label == "bfloat16"
    assert rows["single.safetensors"].size_bytes == single.stat().st_size
    assert rows["weights.pt"].format == "torch" and rows["weights.pt"].num_params == params
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) >= 2
    assert rows["sharded"].format == "safetensors-sharded" and rows["sharded"].num_params == params
    index = sharded / "model.safetensors.index.json"
    assert rows["sharded"].size_bytes == sum(p.stat().st_size for p in shards) + index.stat().st_size
    # the adapter names hf-model as its base: hf-model becomes the base, the adapter is read on top of it
    assert rows["hf-model"].role == ROLE_BASE
    assert rows["adapter"].status == STATUS_READY and rows["adapter"].format == "lora"
    assert rows["adapter"].num_params == params
    # the table shows them
    model = window.table_model
    row = model.row_of(rows["weights.pt"])
    assert model.index(row, COL_FORMAT).data() == "torch"
    assert model.index(model.row_of(rows["hf-model"]), COL_ROLE).data() == ROLE_BASE


def test_bad_file_shows_an_inline_error(make_window, qtbot, tmp_path):
    window = make_window()
    bad = tmp_path / "truncated.safetensors"
    good = write_model(tmp_path / "good", small_model())
    data = (good / "model.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    drop(window.drop_zone, [bad])
    qtbot.waitUntil(lambda: settled(window), timeout=JOB_TIMEOUT_MS)
    [entry] = window.entries
    assert entry.status == STATUS_ERROR
    shown = window.table_model.index(0, COL_FORMAT).data()
    assert shown == entry.error and str(bad) in shown
    assert "Traceback" not in shown
    assert window.table.columnSpan(0, COL_FORMAT) > 1  # one message across the summary columns
    # a merge is refused with a message, not attempted
    assert window.start_merge() is None
    assert "errors" in window.banner.message


def test_dropping_a_non_checkpoint_is_refused(make_window, qtbot, tmp_path):
    window = make_window()
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    drop(window.drop_zone, [notes])
    qtbot.waitUntil(lambda: window.banner.isVisible() and "not a checkpoint" in window.banner.message, timeout=JOB_TIMEOUT_MS)
    assert str(notes) in window.banner.message
    qtbot.waitUntil(lambda: not window.entries, timeout=JOB_TIMEOUT_MS)
    drop(window.drop_zone, [empty])
    qtbot.waitUntil(lambda: "empty-folder" in window.banner.message, timeout=JOB_TIMEOUT_MS)
    qtbot.waitUntil(lambda: not window.entries, timeout=JOB_TIMEOUT_MS)
    assert window.table_stack.currentWidget() is window.drop_zone


def test_dropping_a_folder_of_models_adds_each(make_window, qtbot, demo_workspace):
    window = make_window()
    drop(window, [demo_workspace.root])  # anywhere on the window
    qtbot.waitUntil(lambda: len(window.entries) == 8 and settled(window), timeout=JOB_TIMEOUT_MS)
    roles = {e.path.name: e.role for e in window.entries}
    assert roles["base"] == ROLE_BASE  # the fine-tunes' config.json names it
    assert sum(r == ROLE_BASE for r in roles.values()) == 1


def test_role_and_weight_are_edited_in_the_table(make_window, qtbot, demo_workspace):
    window = make_window()
    drop(window.drop_zone, [demo_workspace.base, *demo_workspace.finetunes.values()])
    qtbot.waitUntil(lambda: len(window.entries) == 4 and settled(window), timeout=JOB_TIMEOUT_MS)
    model = window.table_model
    ft = next(i for i, e in enumerate(window.entries) if e.path.name == "ft_4-6")
    assert model.setData(model.index(ft, COL_WEIGHT), 0.25, Qt.ItemDataRole.EditRole)
    assert model.index(ft, COL_WEIGHT).data() == "0.25"
    assert model.setData(model.index(ft, COL_ROLE), ROLE_BASE, Qt.ItemDataRole.EditRole)
    assert [e.role for e in window.entries].count(ROLE_BASE) == 1 and window.entries[ft].role == ROLE_BASE
    recipe = window.current_recipe()
    assert recipe.base_model == demo_workspace.finetunes["4-6"]
    assert demo_workspace.base in [m.path for m in recipe.models]


# -- preview -------------------------------------------------------------------------------------------


def reference_conflict_rate(ws, density: float) -> float:
    """Sign-conflict rate after a global TIES trim (official rule), over the whole model, in float64."""
    base = load_file(str(ws.base / "model.safetensors"))
    names = sorted(n for n, t in base.items() if t.is_floating_point())
    taus = []
    for folder in ws.finetunes.values():
        ft = load_file(str(folder / "model.safetensors"))
        taus.append(np.concatenate([(ft[n].double() - base[n].double()).numpy().ravel() for n in names]))
    kept = []
    for tau in taus:
        mags = np.sort(np.abs(tau))[::-1]
        m = int(len(tau) * density)
        threshold = mags[m] if m < len(tau) else 0.0
        kept.append(np.where((np.abs(tau) >= threshold) & (tau != 0), tau, 0.0))
    kept = np.stack(kept)
    contested = (kept != 0).sum(axis=0) >= 2
    conflicting = (kept > 0).any(axis=0) & (kept < 0).any(axis=0)
    return conflicting.sum() / contested.sum()


def drawn(plot, kind: str) -> list:
    """What a pyqtgraph PlotItem shows: bar heights, or positions of vertical / horizontal lines."""
    import pyqtgraph as pg

    if kind == "bars":
        return [np.asarray(i.opts["height"], dtype=float) for i in plot.items if isinstance(i, pg.BarGraphItem)]
    angle = 90 if kind == "vlines" else 0
    return [float(i.value()) for i in plot.items if isinstance(i, pg.InfiniteLine) and i.angle == angle]


def test_parameter_change_recomputes_the_preview_in_a_worker(make_window, qtbot, demo_workspace):
    window = make_window(demo_root=demo_workspace.root)
    open_demo(qtbot, window)
    preview = window.preview
    assert preview.data.density == pytest.approx(0.2)
    [overall] = drawn(preview.items["conflict_layers"], "hlines")
    assert overall == pytest.approx(100 * reference_conflict_rate(demo_workspace, 0.2), abs=1e-7)
    image = next(i for i in preview.items["cosine"].items if type(i).__name__ == "ImageItem")
    cos = image.image.T
    assert cos.shape == (3, 3) and np.allclose(np.diag(cos), 1.0) and np.allclose(cos, cos.T)

    runs = preview.runs
    busy: list[bool] = []
    preview.busy_changed.connect(busy.append)
    editor = window.method_panel.editors["density"]
    with qtbot.waitSignal(preview.computed, timeout=JOB_TIMEOUT_MS) as blocker:
        editor.editor.setValue(0.5)  # the user moves the density
        # redrawn at once from the stored density grid, before the worker answers
        assert drawn(preview.items["conflict_density"], "vlines") == [pytest.approx(0.5)]
        qtbot.waitUntil(lambda: preview.runs == runs + 1, timeout=5000)  # debounced, then started
    assert True in busy  # the busy indicator came on while the worker ran
    assert blocker.args[0].density == pytest.approx(0.5)
    [overall] = drawn(preview.items["conflict_layers"], "hlines")
    assert overall == pytest.approx(100 * reference_conflict_rate(demo_workspace, 0.5), abs=1e-7)
    res = preview.data.analysis.interference
    [bars] = drawn(preview.items["conflict_layers"], "bars")
    assert np.allclose(bars, 100 * res.sign_conflict_at(0.5, "layer"))
    thresholds = drawn(preview.items["magnitudes"], "vlines")
    assert np.allclose(thresholds, [np.log10(res.threshold_for(i, 0.5)) for i in range(3)])
    qtbot.waitUntil(lambda: busy[-1] is False and not preview.busy.isVisible(), timeout=5000)


def test_plots_save_as_png_and_svg(make_window, qtbot, demo_workspace, tmp_path):
    window = make_window(demo_root=demo_workspace.root)
    open_demo(qtbot, window)
    for tab in range(4):
        png = window.preview.save_plot(tmp_path / f"plot{tab}.png", tab)
        image = QImage(str(png))
        assert not image.isNull() and image.width() >= 800
        svg = window.preview.save_plot(tmp_path / f"plot{tab}.svg", tab)
        assert svg.read_text(encoding="utf-8").lstrip().startswith(("<?xml", "<svg"))


# -- merge -------------------------------------------------------------------------------------------------


def test_merge_runs_in_a_worker_with_progress(make_window, qtbot, demo_workspace, tmp_path):
    window = make_window(demo_root=demo_workspace.root)
    open_demo(qtbot, window)
    out = tmp_path / "merged"
    window.merge_panel.output.setText(str(out))
    events = []
    with qtbot.waitSignal(window.merge_finished, timeout=JOB_TIMEOUT_MS) as finished:
        job = window.start_merge()
        assert job is not None
        job.progress.connect(events.append)
        assert window.merge_running and not window.merge_panel.merge_button.isEnabled()
        assert window.merge_panel.cancel_button.isEnabled()
    result = finished.args[0]
    assert result.output == out and out.is_dir()
    merge_events = [e for e in events if e.stage == "merge"]
    assert merge_events and merge_events[-1].done == merge_events[-1].total == 6
    assert merge_events[-1].bytes_done == merge_events[-1].bytes_total > 0
    qtbot.waitUntil(lambda: not window.merge_running, timeout=5000)
    assert window.merge_panel.merge_button.isEnabled()
    # the window is a thin layer: the same recipe through the engine gives the same bytes
    direct = run_merge(load_recipe(demo_workspace.recipe), tmp_path / "direct")
    mine, theirs = load_file(str(out / "model.safetensors")), load_file(str(direct.output / "model.safetensors"))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert "Merged in" in window.merge_panel.summary_title.text()


def test_cancel_leaves_nothing_at_the_target(make_window, qtbot, demo_workspace, tmp_path, monkeypatch):
    window = make_window(demo_root=demo_workspace.root)
    open_demo(qtbot, window)
    out = tmp_path / "out" / "merged"
    window.merge_panel.output.setText(str(out))
    halfway, resume = threading.Event(), threading.Event()
    original = jobs.merge_job

    def held(recipe, out_dir, **kw):  # the worker stops at the second tensor until the test has pressed Cancel
        inner = original(recipe, out_dir, **kw)

        def run(progress, cancel):
            def hook(event):
                progress(event)
                if event.stage == "merge" and event.done == 2:
                    halfway.set()
                    resume.wait(30)

            return inner(hook, cancel)

        return run

    monkeypatch.setattr(jobs, "merge_job", held)
    with qtbot.waitSignal(window.merge_cancelled, timeout=JOB_TIMEOUT_MS):
        window.start_merge()
        qtbot.waitUntil(halfway.is_set, timeout=JOB_TIMEOUT_MS)
        qtbot.waitUntil(lambda: window.merge_panel.progress.value() > 0, timeout=5000)  # progress reached the GUI
        window.actions_by_name["cancel"].trigger()
        resume.set()
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no staging folder either
    assert "Cancelled" in window.merge_panel.idle_label.text()
    assert window.merge_panel.merge_button.isEnabled()


# -- recipes ------------------------------------------------------------------------------------------------


def test_recipe_save_and_open_round_trip(make_window, qtbot, demo_workspace, tmp_path):
    window = make_window(demo_root=demo_workspace.root)
    open_demo(qtbot, window)
    panel = window.method_panel
    panel.editors["density"].editor.setValue(0.35)
    panel.editors["scope"].editor.setCurrentText("tensor")
    model = window.table_model
    model.setData(model.index(2, COL_WEIGHT), 0.6, Qt.ItemDataRole.EditRole)
    panel.overrides.add_row()
    table = panel.overrides.table
    table.item(0, 0).setText(r"layers\.4")
    table.item(0, 1).setText("0-3")
    col = 2 + [p.name for p in panel.overrides.params].index("lambda")
    table.item(0, col).setText("0.5")
    panel.curve.param_combo.setCurrentText("lambda")
    panel.curve.enable.setChecked(True)
    panel.curve.spins[0].setValue(0.8)
    panel.seed.setValue(7)
    panel.out_dtype.setCurrentText("bfloat16")

    expected = window.current_recipe()
    assert expected.parameters["density"] == 0.35 and expected.parameters["scope"] == "tensor"
    assert expected.parameters["lambda"] == [0.8, 1.0, 1.0]
    assert expected.overrides[0].match == r"layers\.4" and expected.overrides[0].layers == (0, 3)
    assert expected.overrides[0].parameters == {"lambda": 0.5}
    assert expected.models[1].parameters == {"weight": 0.6}
    assert expected.seed == 7 and expected.out_dtype == "bfloat16"

    path = tmp_path / "mine.yaml"
    assert window.save_recipe_to(path)
    engine = load_recipe(path)  # what `alloy merge mine.yaml` runs
    assert engine.to_dict() == expected.to_dict()
    assert window.settings.recent_recipes()[0] == str(path)

    other = make_window(settings_file=tmp_path / "other.ini")
    other.open_recipe(path)
    qtbot.waitUntil(lambda: len(other.entries) == 4 and settled(other), timeout=JOB_TIMEOUT_MS)
    assert other.current_recipe().to_dict() == engine.to_dict()
    assert other.method_panel.editors["density"].value() == pytest.approx(0.35)
    assert other.recipe_path == path and "mine.yaml" in other.windowTitle()


def test_dropping_a_recipe_opens_it(make_window, qtbot, demo_workspace):
    window = make_window()
    drop(window.drop_zone, [demo_workspace.recipe])
    qtbot.waitUntil(lambda: len(window.entries) == 4 and settled(window), timeout=JOB_TIMEOUT_MS)
    assert window.current_recipe().to_dict() == load_recipe(demo_workspace.recipe).to_dict()


def test_bad_recipe_is_an_inline_message(make_window, qtbot, tmp_path):
    window = make_window()
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: ties\nmodels: []\n")
    window.open_recipe(path)
    assert "models" in window.banner.message and str(path) in window.banner.message
    assert not window.entries


# -- demo end to end ---------------------------------------------------------------------------------------


def test_demo_flow_open_preview_merge_export(make_window, qtbot, demo_workspace, tmp_path):
    window = make_window(demo_root=demo_workspace.root)
    open_demo(qtbot, window)
    assert window.method_panel.settings.method == "ties"
    assert [e.role for e in window.entries] == [ROLE_BASE, ROLE_FINETUNED, ROLE_FINETUNED, ROLE_FINETUNED]
    assert window.preview.data.analysis.interference.n_models == 3

    out = tmp_path / "ties"
    window.merge_panel.output.setText(str(out))
    with qtbot.waitSignals([window.merge_finished, window.after_merge_done], timeout=JOB_TIMEOUT_MS):
        window.actions_by_name["merge"].trigger()
    extra = window.merge_panel.summary_extra.text()
    assert "Retention" in extra and "Demo test accuracy" in extra
    for label in ("ft_0-3", "ft_4-6", "ft_7-9"):
        assert label in extra
    assert window.preview.tabs.tabText(5) == "Retention" and "retention" in window.preview.items

    dialog = window.export_dialog()
    target = tmp_path / "exported"
    dialog.target.setText(str(target))
    dialog.dtype.setCurrentText("bfloat16")
    dialog.shard.setText("40KB")
    with qtbot.waitSignal(dialog.exported, timeout=JOB_TIMEOUT_MS):
        dialog.start_button.click()
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    exported = {}
    for shard in shards:
        exported.update(load_file(str(target / shard)))
    merged = load_file(str(out / "model.safetensors"))
    assert exported.keys() == merged.keys()
    for name, tensor in merged.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], tensor.to(torch.bfloat16))
    assert (target / "alloy_recipe.yaml").read_text() == (out / "alloy_recipe.yaml").read_text()
    assert (target / "README.md").is_file() and (target / "config.json").is_file()
    assert "Exported to" in dialog.message.text()
    dialog.close()


def test_export_to_hub_dialog(make_window, qtbot, demo_workspace, tmp_path, hub, token, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    window = make_window(demo_root=demo_workspace.root)
    open_demo(qtbot, window)
    window.merge_panel.output.setText(str(tmp_path / "merged"))
    with qtbot.waitSignal(window.merge_finished, timeout=JOB_TIMEOUT_MS):
        window.start_merge()
    assert window.merge_panel.hub_button.isEnabled()
    dialog = window.hub_dialog()
    dialog.repo.setText("not a/valid id")
    assert not dialog.start_button.isEnabled() and dialog.repo_error.text()
    dialog.repo.setText("alice/merged-demo")
    assert dialog.start_button.isEnabled() and not dialog.repo_error.text()
    assert dialog.token.echoMode() == dialog.token.EchoMode.Password
    dialog.token.setText(token)
    dialog.show_token.setChecked(True)
    assert dialog.token.echoMode() == dialog.token.EchoMode.Normal
    dialog.show_token.setChecked(False)
    dialog.license.setText("mit")
    with qtbot.waitSignal(dialog.pushed, timeout=JOB_TIMEOUT_MS) as pushed:
        dialog.start_button.click()
    result = pushed.args[0]
    repo = hub.repo("alice/merged-demo")
    assert "model.safetensors" in repo.files and "alloy_recipe.yaml" in repo.files
    assert b"license: mit" in repo.files["README.md"].data
    assert result.repo_url in dialog.message.text() and "href" in dialog.message.text()
    assert token not in dialog.message.text() and dialog.token.text() == ""
    dialog.close()

    # a refused token: a clear message, never the token
    dialog = window.hub_dialog()
    dialog.repo.setText("alice/other")
    dialog.token.setText("hf_bogus_token_123")
    dialog.start_button.click()
    qtbot.waitUntil(lambda: dialog.job is not None and not dialog.job.running, timeout=JOB_TIMEOUT_MS)
    qtbot.waitUntil(lambda: "401" in dialog.message.text() or "rejected" in dialog.message.text(), timeout=5000)
    assert "hf_bogus_token_123" not in dialog.message.text()
    dialog.close()


# -- window state and start-up ---------------------------------------------------------------------------------


def test_window_restores_size_and_splitters(make_window, qtbot, tmp_path):
    ini = tmp_path / "state.ini"
    first = make_window(settings_file=ini)
    first.resize(790, 700)  # inside the offscreen screen (800×800), which restoreGeometry respects
    first.splitter.setSizes([300, 350])
    qtbot.wait(50)
    sizes = first.splitter.sizes()
    first.settings.set_last_folder("checkpoints", tmp_path)
    first.close()
    second = make_window(settings_file=ini)
    qtbot.wait(50)
    assert (second.width(), second.height()) == (790, 700)
    assert second.splitter.sizes() == sizes
    assert second.settings.last_folder("checkpoints") == str(tmp_path)


def test_keyboard_shortcuts(make_window):
    window = make_window()
    shortcut = {name: a.shortcut().toString() for name, a in window.actions_by_name.items()}
    assert shortcut["open_recipe"] == "Ctrl+O" and shortcut["save_recipe"] == "Ctrl+S"
    assert shortcut["merge"] == "Ctrl+Return" and shortcut["cancel"] == "Esc"
    assert shortcut["export"] == "Ctrl+E" and shortcut["open_demo"] == "Ctrl+D"
    assert shortcut["refresh_preview"] == "F5" and shortcut["quit"] == "Ctrl+Q"
    assert shortcut["save_recipe_as"] == "Ctrl+Shift+S" and shortcut["add_files"] == "Ctrl+Shift+O"


def test_dark_palette(qapp):
    from PySide6.QtGui import QPalette

    from app.theme import Theme

    theme = Theme(qapp, force="dark")
    try:
        assert qapp.palette().color(QPalette.ColorRole.Window).lightness() < 80
        assert theme.colors.dark
    finally:
        theme.force = "light"
        theme.apply()
    assert qapp.palette().color(QPalette.ColorRole.Window).lightness() > 200


def test_window_paints_before_the_engine_is_imported(tmp_path):
    code = "import sys, app.main, app.window; print(sorted(m for m in ('torch', 'numba', 'pyqtgraph') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
    env = {"QT_QPA_PLATFORM": "offscreen", "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "app.main", "--startup-time"], capture_output=True, text=True, env=env,
                         timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("first paint")][0]
    paint_ms, engine_ms = (float(part.split()[0]) for part in line.replace("first paint: ", "").split("after process start; engine loaded: "))
    assert paint_ms < engine_ms
