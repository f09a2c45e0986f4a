"""`alloy --self-test OUTDIR`: prove a build works by using it the way a person would.

It opens the main window (offscreen unless a platform is chosen), clicks Open
demo, waits for the four demo models, presses Merge through the window's own
worker, then checks the output: it loads back, has the base's tensors and
shapes, is finite, equals a headless `run_merge` of the same recipe bit for
bit, and scores on the demo's test digits. It also checks that the Numba
kernels were cached in the user-writable folder. Everything it measured goes to
OUTDIR/self-test.json; the exit status is 0 only when every check passed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

STEP_TIMEOUT_S = 600.0
REPORT_NAME = "self-test.json"


class SelfTestError(Exception):
    """A check failed; the message says which and why."""


def _say(message: str) -> None:
    if sys.stdout is not None:  # a windowed Windows build has no stdout
        print(message, flush=True)


def _wait_until(condition: Callable[[], bool], what: str, *, fail: Callable[[], str | None] | None = None,
                timeout_s: float = STEP_TIMEOUT_S) -> None:
    """Run the event loop until `condition()`; stop early with the window's error message, if it shows one."""
    from PySide6.QtCore import QEventLoop, QTimer

    deadline = time.monotonic() + timeout_s
    while not condition():
        problem = fail() if fail is not None else None
        if problem:
            raise SelfTestError(f"while waiting for {what}: {problem}")
        if time.monotonic() > deadline:
            raise SelfTestError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        loop = QEventLoop()
        QTimer.singleShot(20, loop.quit)
        loop.exec()


def _banner_error(window: Any) -> str | None:
    banner = window.banner
    if banner.isVisible() and banner.property("kind") == "error":
        return banner.message or "the window shows an error"
    return None


def _numba_cache_files() -> list[Path]:
    folder = os.environ.get("NUMBA_CACHE_DIR")
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(Path(folder).rglob("*.nbi"))


def check_output(merged_dir: Path, workspace: Any, outdir: Path) -> dict[str, Any]:
    """The merged folder against the base (names, shapes) and a headless merge of the same recipe (values)."""
    import torch

    from merging import demo_models
    from merging.checkpoint import open_checkpoint
    from merging.executor import run_merge
    from merging.recipe import load_recipe

    reference = run_merge(load_recipe(workspace.recipe), outdir / "reference", overwrite=True)
    merged = open_checkpoint(merged_dir)
    ref = open_checkpoint(reference.output)
    base = open_checkpoint(workspace.base)
    try:
        if sorted(merged.names()) != sorted(base.names()):
            raise SelfTestError(f"{merged_dir}: tensor names differ from the base model's")
        changed = 0
        for name in base.names():
            got, want, start = merged.get(name), ref.get(name), base.get(name)
            if tuple(got.shape) != tuple(start.shape):
                raise SelfTestError(f"{merged_dir}: tensor {name} has shape {tuple(got.shape)}, "
                                    f"the base has {tuple(start.shape)}")
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise SelfTestError(f"{merged_dir}: tensor {name} has NaN or Inf values")
            if got.dtype != want.dtype or not torch.equal(got, want):
                raise SelfTestError(f"{merged_dir}: tensor {name} differs from the headless merge of the same recipe")
            changed += int(not torch.equal(got.to(start.dtype), start))
        if changed == 0:
            raise SelfTestError(f"{merged_dir}: every tensor equals the base; the merge changed nothing")
        tensors = len(base.names())
    finally:
        for ck in (merged, ref, base):
            ck.close()
    scores = demo_models.evaluate(merged_dir)
    base_scores = demo_models.evaluate(workspace.base)
    return {
        "tensors": tensors,
        "tensors_changed": changed,
        "merged_accuracy": scores["accuracy"],
        "merged_mean_task_accuracy": scores["mean_task_accuracy"],
        "base_accuracy": base_scores["accuracy"],
        "base_mean_task_accuracy": base_scores["mean_task_accuracy"],
    }


def run(outdir: Path) -> int:
    """The whole self-test; returns the process exit status."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["ALLOY_NO_WELCOME"] = "1"
    outdir = Path(outdir).expanduser().absolute()
    outdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "ok": False,
        "frozen": bool(getattr(sys, "frozen", False)),
        "executable": sys.executable,
        "platform": os.environ.get("QT_QPA_PLATFORM"),
        "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR"),
        "seconds": {},
    }
    started = time.perf_counter()

    def mark(step: str) -> None:
        report["seconds"][step] = round(time.perf_counter() - started, 3)
        _say(f"self-test: {step} after {report['seconds'][step]:.1f} s")

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.main import seconds_since_process_start
    from app.settings import APPLICATION, ORGANIZATION, AppSettings
    from app.window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName(APPLICATION)
    app.setOrganizationName(ORGANIZATION)
    settings = AppSettings(QSettings(str(outdir / "settings.ini"), QSettings.Format.IniFormat))
    window = MainWindow(settings)
    window.show()
    app.processEvents()
    report["seconds"]["window_shown_since_process_start"] = round(seconds_since_process_start(), 3)
    try:
        cached_before = len(_numba_cache_files())
        _wait_until(lambda: window.engine_ready, "the merge engine to load", fail=lambda: _banner_error(window))
        report["seconds"]["engine_loaded_since_process_start"] = round(seconds_since_process_start(), 3)
        mark("engine_loaded")

        window.actions_by_name["open_demo"].trigger()
        _wait_until(lambda: len(window.entries) == 4 and all(e.ready for e in window.entries),
                    "the demo models to open", fail=lambda: _banner_error(window))
        mark("demo_opened")

        merged_dir = outdir / "merged"
        outcome: dict[str, Any] = {}
        window.merge_finished.connect(lambda result: outcome.setdefault("result", result))
        window.merge_failed.connect(lambda message: outcome.setdefault("error", message))
        window.merge_cancelled.connect(lambda: outcome.setdefault("error", "the merge was cancelled"))
        window.merge_panel.output.setText(str(merged_dir))
        if window.start_merge(overwrite=True) is None:
            raise SelfTestError(f"the window did not start the merge: {window.banner.message or 'no reason shown'}")
        _wait_until(lambda: bool(outcome), "the merge")
        if "error" in outcome:
            raise SelfTestError(f"the merge failed: {outcome['error']}")
        result = outcome["result"]
        mark("merged")
        report["merge"] = {"output": str(result.output), "seconds": round(result.seconds, 3), "tensors": result.tensors,
                           "output_bytes": result.output_bytes, "warnings": list(result.warnings)}
        _wait_until(lambda: window.after_job is None or not window.after_job.running, "the merge summary")

        report["check"] = check_output(Path(result.output), window.demo_workspace, outdir)
        mark("checked")

        cache_files = _numba_cache_files()
        report["numba_cache"] = {"index_files_before": cached_before, "index_files_after": len(cache_files)}
        if report["frozen"] and not cache_files:
            raise SelfTestError(f"no Numba cache was written to {os.environ.get('NUMBA_CACHE_DIR')}")
        report["ok"] = True
    except SelfTestError as exc:
        report["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - the report must say what broke, whatever it was
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
    finally:
        window.shutdown()
        window.hide()
        window.deleteLater()
        app.processEvents()
    report["seconds"]["total"] = round(time.perf_counter() - started, 3)
    (outdir / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    if report["ok"]:
        check = report["check"]
        _say(f"self-test passed: {check['tensors']} tensors merged and checked; demo accuracy "
             f"{check['merged_accuracy']:.3f} merged vs {check['base_accuracy']:.3f} base; report {outdir / REPORT_NAME}")
        return 0
    _say(f"self-test FAILED: {report['error']}")
    if "traceback" in report:
        _say(report["traceback"])
    return 1
