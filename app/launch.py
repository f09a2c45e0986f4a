"""`make run`: the window when there is a display, the demo merge when there is none."""

from __future__ import annotations

import os
import sys


def has_display() -> bool:
    """True when Qt can open a real window (an explicit QT_QPA_PLATFORM counts)."""
    if os.environ.get("QT_QPA_PLATFORM"):
        return os.environ["QT_QPA_PLATFORM"] not in ("offscreen", "minimal")
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def main() -> int:
    if has_display():
        from app.main import main as gui_main

        return gui_main()
    print("No display found: running the headless demo merge instead of the window.", file=sys.stderr)
    from merging.cli import main as cli_main

    return cli_main(["demo"])


if __name__ == "__main__":
    sys.exit(main())
