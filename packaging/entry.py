"""The packaged app's entry point (PyInstaller's script): the window, or `--self-test OUTDIR`.

The engine (`merging`) ships as .py source, because Numba keys its kernel
cache on a real source file. The app's own folder may be read-only, so before
anything imports Numba this points Numba's cache, and Python's bytecode cache
for that source, at folders the user can write: `<cache>/numba/<build id>` and
`<cache>/pycache/<build id>`, where `<cache>` is the folder the demo models use
too ($ALLOY_CACHE_DIR, else $XDG_CACHE_HOME/alloy, else ~/.cache/alloy). The
build id changes with every build whose engine sources differ, so a kernel
compiled by an older build is never loaded by a newer one.

Everything else goes to `app.main.main`, file paths included, so a
double-clicked `.safetensors` file opens in the window.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

BUILD_INFO = "alloy_build.json"


def is_frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def bundle_dir() -> Path:
    """Where the packaged app's data lives (PyInstaller's _MEIPASS), or this folder when run from source."""
    return Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parent))


def build_info() -> dict:
    """What the build recorded about itself (version, build id); empty when run from source."""
    try:
        info = json.loads((bundle_dir() / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def user_cache_dir() -> Path:
    """The same cache root `merging.demo.default_root` uses."""
    cache = os.environ.get("ALLOY_CACHE_DIR")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = os.path.join(xdg, "alloy") if xdg else os.path.join(Path.home(), ".cache", "alloy")
    return Path(cache)


def writable_folder(folder: Path) -> bool:
    """Create `folder` if needed and prove a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def build_cache_folder(kind: str) -> Path:
    return user_cache_dir() / kind / str(build_info().get("build_id", "unknown-build"))


def configure_bytecode_cache() -> Path | None:
    """Frozen: compiled bytecode of the engine's source goes to a user folder (never into the app folder)."""
    if not is_frozen():
        return None
    folder = build_cache_folder("pycache")
    if writable_folder(folder):
        sys.pycache_prefix = str(folder)
        sys.dont_write_bytecode = False  # PyInstaller turns writing off; the prefix keeps it out of the app folder
        return folder
    sys.dont_write_bytecode = True
    return None


def configure_numba_cache() -> Path | None:
    """Set NUMBA_CACHE_DIR for a frozen app (unless the user set it); without a writable folder, cache nothing.

    Returns the folder in use, or None when Numba's own default applies (running from source).
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    if not is_frozen():
        return None
    folder = build_cache_folder("numba")
    if not writable_folder(folder):
        os.environ["ALLOY_NUMBA_CACHE"] = "0"  # compile on every launch rather than fail to start
        return None
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    return folder


def split_self_test(argv: list[str]) -> tuple[Path | None, list[str]]:
    """(OUTDIR of `--self-test OUTDIR` or `--self-test=OUTDIR`, the other arguments)."""
    rest: list[str] = []
    outdir: Path | None = None
    args = iter(argv)
    for arg in args:
        if arg == "--self-test":
            value = next(args, None)
            if value is None:
                raise SystemExit("alloy: --self-test needs a folder for its output (--self-test OUTDIR)")
            outdir = Path(value)
        elif arg.startswith("--self-test="):
            outdir = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return outdir, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_bytecode_cache()
    configure_numba_cache()
    outdir, rest = split_self_test(argv)
    if outdir is not None:
        from alloy_self_test import run

        return run(outdir)
    from app.main import main as gui_main

    return gui_main(rest)


if __name__ == "__main__":
    import multiprocessing

    multiprocessing.freeze_support()
    sys.exit(main())
