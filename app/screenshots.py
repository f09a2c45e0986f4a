"""`python -m app.screenshots OUTDIR`: PNGs of the window's main states at 1280×800 and 1920×1080.

States: empty, demo loaded (each preview tab), merging (a real merge held
halfway through while the picture is taken), done, the alignment demo, and
the loaded state in the dark palette. Runs offscreen unless a display is
asked for; settings go to a throw-away file, the demo models to a cache
folder (built once, about 10 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

SIZES = ((1280, 800), (1920, 1080))


def _wait(app: Any, condition: Callable[[], bool], timeout: float = 120.0, what: str = "the window") -> None:
    end = time.monotonic() + timeout
    while not condition():
        app.processEvents()
        time.sleep(0.01)
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
    for _ in range(5):
        app.processEvents()


def _settle(app: Any, seconds: float = 0.15) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


class _HeldMerge:
    """Wraps the merge job so the worker pauses halfway (after a real progress event) until released."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def install(self) -> Callable[[], None]:
        from . import jobs

        original = jobs.merge_job

        def held_merge_job(recipe, out_dir, **kw):
            inner = original(recipe, out_dir, **kw)

            def run(progress, cancel):
                def hook(event):
                    progress(event)
                    if event.stage == "merge" and event.done * 2 >= event.total and not self.reached.is_set():
                        time.sleep(0.2)  # let the GUI receive this event
                        self.reached.set()
                        self.release.wait(60)

                return inner(hook, cancel)

            return run

        jobs.merge_job = held_merge_job
        return lambda: setattr(jobs, "merge_job", original)


def take(out_dir: Path, *, demo_root: Path | None = None, sizes=SIZES) -> list[Path]:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from .preview import TAB_ALIGNMENT, TAB_CONFLICTS, TAB_MAGNITUDES, TAB_PCB, TAB_SIMILARITY
    from .settings import AppSettings
    from .theme import Theme
    from .window import MainWindow
    from .workers import cancel_all

    app = QApplication.instance() or QApplication([sys.argv[0]])
    theme = Theme(app, force="light")
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="alloy-shots-"))
    written: list[Path] = []

    def shot(window: Any, name: str, size: tuple[int, int]) -> None:
        _settle(app)
        path = out_dir / f"{name}-{size[0]}x{size[1]}.png"
        window.grab().save(str(path))
        written.append(path)
        print(path, flush=True)

    for size in sizes:
        theme.force = "light"
        theme.apply()
        settings = AppSettings(QSettings(str(scratch / f"settings-{size[0]}.ini"), QSettings.Format.IniFormat))
        window = MainWindow(settings, demo_root=demo_root, theme=theme)
        window.resize(*size)
        window.show()
        _wait(app, lambda: window.engine_ready, what="the engine")
        shot(window, "01-empty", size)

        window.open_demo()
        _wait(app, lambda: len(window.entries) == 4 and all(e.ready for e in window.entries), what="the demo models")
        _wait(app, lambda: window.preview.data is not None and not window.preview.running, what="the preview")
        window.merge_panel.output.setText(str(scratch / f"merged-{size[0]}"))
        for tab, name in ((TAB_SIMILARITY, "02-loaded-similarity"), (TAB_CONFLICTS, "03-loaded-sign-conflicts"),
                          (TAB_MAGNITUDES, "04-loaded-magnitudes"), (TAB_PCB, "05-loaded-pcb")):
            window.preview.tabs.setCurrentIndex(tab)
            shot(window, name, size)
        window.preview.tabs.setCurrentIndex(TAB_CONFLICTS)
        panel = window.method_panel
        panel.tabs.setCurrentIndex(1)
        panel.overrides.add_row()
        table = panel.overrides.table
        table.item(0, 0).setText(r"layers\.4")
        table.item(0, 2 + [p.name for p in panel.overrides.params].index("lambda")).setText("0.8")
        shot(window, "06-overrides", size)
        panel.tabs.setCurrentIndex(2)
        panel.curve.param_combo.setCurrentText("lambda")
        panel.curve.enable.setChecked(True)
        panel.curve.spins[0].setValue(0.7)
        panel.curve.spins[2].setValue(1.2)
        shot(window, "06-layer-curve", size)
        panel.tabs.setCurrentIndex(0)

        held = _HeldMerge()
        restore = held.install()
        try:
            if window.start_merge() is None:
                raise RuntimeError(f"the merge did not start: {window.banner.message}")
            _wait(app, lambda: held.reached.is_set() or window.merge_job is None, what="the merge to reach halfway")
            if not held.reached.is_set():
                raise RuntimeError(f"the merge stopped early: {window.banner.message}")
            _settle(app, 0.4)
            shot(window, "07-merging", size)
        finally:
            held.release.set()
            restore()
        _wait(app, lambda: window.merge_job is None, what="the merge")
        _wait(app, lambda: window.after_job is not None and not window.after_job.running, what="retention")
        shot(window, "08-done", size)

        theme.force = "dark"
        theme.apply()
        shot(window, "09-done-dark", size)
        theme.force = "light"
        theme.apply()

        window.open_alignment_demo()
        _wait(app, lambda: len(window.entries) == 2 and all(e.ready for e in window.entries), what="the alignment demo")
        _wait(app, lambda: window.preview.data is not None and not window.preview.running
              and bool(window.preview.data.analysis.alignments), what="the alignment preview")
        window.preview.tabs.setCurrentIndex(TAB_ALIGNMENT)
        shot(window, "10-alignment", size)
        tab = window.preview.widgets[TAB_ALIGNMENT]
        if tab.switch_bar.isVisible():
            tab.switch_group.button(1).click()
            shot(window, "11-loss-barrier", size)
        window.shutdown()
        window.close()
        window.deleteLater()
        _settle(app)
    cancel_all()
    shutil.rmtree(scratch, ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--demo-root", type=Path, default=None, help="demo workspace folder (default: the user cache)")
    parser.add_argument("--size", action="append", default=None, help="WIDTHxHEIGHT (repeatable; default 1280x800 and 1920x1080)")
    args = parser.parse_args(argv)
    sizes = SIZES if not args.size else tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.size)
    take(args.out, demo_root=args.demo_root, sizes=sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
