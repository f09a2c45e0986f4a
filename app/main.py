"""`alloy-gui` / `python -m app.main`: open the window fast, load the engine behind it.

Only Qt is imported before the first paint. torch, numba, the merge methods and
pyqtgraph are imported by a background job right after the window shows (see
`MainWindow.start_engine`), so the window appears in a fraction of a second
and fills in its method list when the engine is ready.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

_IMPORTED_AT = time.perf_counter()


def seconds_since_process_start() -> float:
    """Wall time since this process started (Linux: from /proc; elsewhere: since this module was imported)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED_AT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alloy-gui", description="Alloy: merge fine-tuned checkpoints.")
    parser.add_argument("paths", nargs="*", type=Path, help="checkpoints or a recipe (.yaml) to open")
    parser.add_argument("--demo", action="store_true", help="open the demo workspace on start")
    parser.add_argument("--theme", choices=("system", "light", "dark"), default=None, help="override the colour scheme")
    parser.add_argument("--startup-time", action="store_true",
                        help="print the time to the first paint and to the loaded engine, then quit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from PySide6.QtCore import QEvent, QObject, QTimer
    from PySide6.QtWidgets import QApplication

    from .resources import app_icon
    from .settings import APPLICATION, ORGANIZATION, AppSettings
    from .theme import Theme
    from .window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName(APPLICATION)
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationDisplayName("Alloy")
    app.setWindowIcon(app_icon())
    app.setDesktopFileName("alloy")
    settings = AppSettings()
    chosen = args.theme or str(settings.value("view/theme", "system"))
    theme = Theme(app, force=None if chosen == "system" else chosen)
    window = MainWindow(settings, theme=theme)

    timings: dict[str, float] = {}

    class FirstPaint(QObject):
        def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt name
            if event.type() == QEvent.Type.Paint and "first_paint" not in timings:
                timings["first_paint"] = seconds_since_process_start()
                obj.removeEventFilter(self)
            return False

    probe = FirstPaint(window)
    window.installEventFilter(probe)

    if args.startup_time:
        def report() -> None:
            timings["engine"] = seconds_since_process_start()
            print(f"first paint: {timings.get('first_paint', float('nan')) * 1000:.0f} ms after process start; "
                  f"engine loaded: {timings['engine'] * 1000:.0f} ms", flush=True)
            window.shutdown()
            app.quit()

        window.engine_loaded.connect(lambda: QTimer.singleShot(0, report))
    window.show()
    if args.paths:
        window.add_paths([p.expanduser().absolute() for p in args.paths])
    if args.demo:
        window.open_demo()
    elif not args.paths and not args.startup_time:
        try:
            from .welcome import show_welcome_if_first_run
        except ImportError:
            pass
        else:
            show_welcome_if_first_run(window, settings, open_demo=window.open_demo)
    code = app.exec()
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
