"""The desktop app's packaging: icons, desktop entry, MIME type, install script, frozen entry point (fast),
and the built executable itself (slow: `make test-package` builds it when missing and runs these).

The slow tests launch dist/alloy/alloy with an empty environment and a PATH with no Python on it, offscreen,
with `--self-test`: it opens the demo through the window, merges it, and checks the output against a
headless merge of the same recipe.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
RESOURCES = ROOT / "resources"
APP_DIR = ROOT / "dist" / "alloy"
APP = APP_DIR / "alloy"
INSTALL = PACKAGING / "install-linux.sh"
PNG_SIZES = (16, 24, 32, 48, 64, 128, 256, 512)
MIME_TYPE = "application/x-safetensors"


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- icons -------------------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_icon_pngs_have_their_sizes_and_match_the_svg(qapp):
    for size in PNG_SIZES:
        assert png_size(RESOURCES / "icons" / "png" / f"alloy-{size}.png") == (size, size)
    from PySide6.QtGui import QImage

    icons = load_module("render_icons", PACKAGING / "render_icons.py")
    for size in (16, 48):  # the committed PNGs are the SVG as rendered now (re-run render_icons.py after edits)
        fresh = icons.render(size).convertToFormat(QImage.Format.Format_ARGB32)
        stored = QImage(str(RESOURCES / "icons" / "png" / f"alloy-{size}.png")).convertToFormat(QImage.Format.Format_ARGB32)
        diffs = [abs(((fresh.pixel(x, y) >> s) & 255) - ((stored.pixel(x, y) >> s) & 255))
                 for x in range(size) for y in range(size) for s in (0, 8, 16, 24)]
        assert max(diffs) <= 2, size
        # drawn, not blank: the tile covers the middle, the corners stay transparent
        assert (stored.pixel(size // 2, size // 2) >> 24) == 255 and (stored.pixel(0, 0) >> 24) < 64


def test_ico_and_icns_hold_every_size():
    ico = (RESOURCES / "icons" / "alloy.ico").read_bytes()
    reserved, kind, count = struct.unpack("<HHH", ico[:6])
    assert (reserved, kind) == (0, 1)
    sizes = []
    for i in range(count):
        w, h, _c, _r, _planes, bpp, length, offset = struct.unpack("<BBBBHHII", ico[6 + 16 * i: 22 + 16 * i])
        side = w or 256
        assert (w, h, bpp) == (w, w, 32)
        assert struct.unpack(">II", ico[offset + 16: offset + 24]) == (side, side)
        assert offset + length <= len(ico)
        sizes.append(side)
    assert sizes == [16, 24, 32, 48, 64, 128, 256]

    icns = (RESOURCES / "icons" / "alloy.icns").read_bytes()
    assert icns[:4] == b"icns" and struct.unpack(">I", icns[4:8])[0] == len(icns)
    pos, found = 8, {}
    while pos < len(icns):
        kind, length = icns[pos:pos + 4], struct.unpack(">I", icns[pos + 4:pos + 8])[0]
        found[kind] = struct.unpack(">II", icns[pos + 24:pos + 32])[0]
        pos += length
    assert pos == len(icns)
    assert found == {b"icp4": 16, b"icp5": 32, b"icp6": 64, b"ic07": 128, b"ic08": 256, b"ic09": 512, b"ic10": 1024,
                     b"ic11": 32, b"ic12": 64, b"ic13": 256, b"ic14": 512}


# -- desktop entry and MIME type -----------------------------------------------------------------------


def desktop_entry(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(path, encoding="utf-8")
    return dict(parser["Desktop Entry"])


def test_desktop_entry_and_mime_definition():
    entry = desktop_entry(RESOURCES / "alloy.desktop")
    assert entry["Type"] == "Application" and entry["Name"] == "Alloy" and entry["Icon"] == "alloy"
    assert entry["Exec"].split()[-1] == "%F"  # files from a double-click or a drop on the launcher
    assert MIME_TYPE in entry["MimeType"].split(";")
    assert entry["Terminal"] == "false" and entry["StartupWMClass"] == "alloy"  # app.main sets desktop file name alloy

    ns = {"m": "http://www.freedesktop.org/standards/shared-mime-info"}
    root = ET.parse(RESOURCES / "mime" / "alloy-safetensors.xml").getroot()
    [mime] = root.findall("m:mime-type", ns)
    assert mime.get("type") == MIME_TYPE
    assert [g.get("pattern") for g in mime.findall("m:glob", ns)] == ["*.safetensors"]


# -- install script --------------------------------------------------------------------------------------


def fake_app(tmp_path: Path) -> Path:
    app = tmp_path / "built" / "alloy"
    (app / "_internal").mkdir(parents=True)
    (app / "alloy").write_text("#!/bin/sh\necho alloy \"$@\"\n")
    (app / "alloy").chmod(0o755)
    (app / "_internal" / "marker.txt").write_text("bundle")
    return app


def run_install(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    return subprocess.run(["sh", str(INSTALL), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the install script is for Linux desktops")
def test_install_and_uninstall_for_the_user(tmp_path):
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    mimeapps = home / ".config" / "mimeapps.list"
    mimeapps.write_text("[Default Applications]\ntext/plain=gedit.desktop;\napplication/x-safetensors=other.desktop;\n"
                        "\n[Added Associations]\ntext/plain=gedit.desktop;\n")
    app = fake_app(tmp_path)
    done = run_install(home, "install", str(app))
    assert done.returncode == 0, done.stderr
    local = home / ".local"
    installed = local / "opt" / "alloy"
    assert (installed / "_internal" / "marker.txt").read_text() == "bundle"
    assert os.access(installed / "alloy", os.X_OK)
    assert os.readlink(local / "bin" / "alloy-app") == str(installed / "alloy")
    entry = desktop_entry(local / "share" / "applications" / "alloy.desktop")
    assert entry["Exec"] == f'"{installed / "alloy"}" %F'  # absolute: no reliance on PATH
    assert entry["TryExec"] == str(installed / "alloy")
    for size in PNG_SIZES:
        icon = local / "share" / "icons" / "hicolor" / f"{size}x{size}" / "apps" / "alloy.png"
        assert icon.read_bytes() == (RESOURCES / "icons" / "png" / f"alloy-{size}.png").read_bytes()
    assert (local / "share" / "icons" / "hicolor" / "scalable" / "apps" / "alloy.svg").is_file()
    assert (local / "share" / "mime" / "packages" / "alloy-safetensors.xml").is_file()
    # Alloy replaced the old default for .safetensors; other entries and sections are untouched
    lines = mimeapps.read_text().splitlines()
    assert f"{MIME_TYPE}=alloy.desktop;" in lines and f"{MIME_TYPE}=other.desktop;" not in lines
    assert lines.count("text/plain=gedit.desktop;") == 2

    if shutil.which("update-mime-database", path="/usr/bin:/bin"):
        # the compiled database maps *.safetensors to the new type, as Qt (and file managers) read it
        globs = (local / "share" / "mime" / "globs2").read_text()
        assert f"{MIME_TYPE}:*.safetensors" in globs
        probe = ("import sys; from PySide6.QtCore import QCoreApplication, QMimeDatabase; a = QCoreApplication([]); "
                 "print(QMimeDatabase().mimeTypeForFile('m.safetensors', QMimeDatabase.MatchMode.MatchExtension).name())")
        env = dict(os.environ, XDG_DATA_HOME=str(local / "share"))
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == MIME_TYPE, out.stderr

    again = run_install(home, "install", str(app))  # reinstalling replaces the folder in place
    assert again.returncode == 0, again.stderr
    assert not (local / "opt" / "alloy.new").exists()

    gone = run_install(home, "uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not installed.exists() and not (local / "bin" / "alloy-app").exists()
    assert not (local / "share" / "applications" / "alloy.desktop").exists()
    assert not (local / "share" / "mime" / "packages" / "alloy-safetensors.xml").exists()
    assert not list((local / "share" / "icons").rglob("alloy.*"))
    lines = mimeapps.read_text().splitlines()
    assert not any(line.startswith(MIME_TYPE) for line in lines) and lines.count("text/plain=gedit.desktop;") == 2


def test_install_refuses_a_missing_build(tmp_path):
    done = run_install(tmp_path / "home", "install", str(tmp_path / "nothing"))
    assert done.returncode == 1 and "make package" in done.stderr
    assert not (tmp_path / "home" / ".local" / "opt").exists()


# -- the frozen entry point, without freezing ------------------------------------------------------------


@pytest.fixture
def entry(monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.delenv("ALLOY_NUMBA_CACHE", raising=False)
    return load_module("alloy_entry", PACKAGING / "entry.py")


def test_self_test_flag_is_split_from_the_app_arguments(entry, tmp_path):
    assert entry.split_self_test(["--self-test", "out", "--theme", "dark"]) == (Path("out"), ["--theme", "dark"])
    assert entry.split_self_test(["--self-test=o2"]) == (Path("o2"), [])
    assert entry.split_self_test(["a.safetensors", "--demo"]) == (None, ["a.safetensors", "--demo"])
    with pytest.raises(SystemExit, match="needs a folder"):
        entry.split_self_test(["--self-test"])


def test_frozen_app_puts_the_numba_cache_in_a_user_folder_per_build(entry, monkeypatch, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / entry.BUILD_INFO).write_text(json.dumps({"version": "0.1.0", "build_id": "0.1.0-abc"}))
    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path / "cache"))
    assert entry.configure_numba_cache() is None  # from source: numba's own default
    assert "NUMBA_CACHE_DIR" not in os.environ
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(bundle), raising=False)
    folder = entry.configure_numba_cache()
    assert folder == tmp_path / "cache" / "numba" / "0.1.0-abc" and folder.is_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == str(folder)
    assert list(folder.iterdir()) == []  # the write probe cleaned up after itself
    # a folder set by the user wins
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert entry.configure_numba_cache() == tmp_path / "mine"


def test_frozen_app_without_a_writable_cache_turns_caching_off(entry, monkeypatch, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ALLOY_CACHE_DIR", str(blocker))
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert entry.configure_numba_cache() is None
    assert os.environ["ALLOY_NUMBA_CACHE"] == "0" and "NUMBA_CACHE_DIR" not in os.environ
    assert entry.configure_bytecode_cache() is None and sys.dont_write_bytecode is True


def test_frozen_app_compiles_the_engine_source_into_a_user_folder(entry, monkeypatch, tmp_path):
    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # as PyInstaller's bootloader leaves it
    assert entry.configure_bytecode_cache() is None and sys.pycache_prefix is None  # from source: untouched
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path / "no-build-info"), raising=False)
    folder = entry.configure_bytecode_cache()
    assert folder == tmp_path / "cache" / "pycache" / "unknown-build" and sys.pycache_prefix == str(folder)
    assert sys.dont_write_bytecode is False


# -- the built app (slow) --------------------------------------------------------------------------------


def built_app() -> Path:
    """dist/alloy/alloy; built first when ALLOY_TEST_PACKAGE=build, otherwise skipped when absent."""
    if not APP.exists() and os.environ.get("ALLOY_TEST_PACKAGE") == "build":
        subprocess.run(["make", "package"], cwd=ROOT, check=True)
    if not APP.exists():
        pytest.skip("no built app in dist/alloy (run `make package`, or `make test-package`)")
    return APP


def bare_env(home: Path, bin_dir: Path) -> dict[str, str]:
    """What a desktop launcher gives: HOME, a PATH (here with nothing on it), an offscreen display."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "PATH": str(bin_dir), "QT_QPA_PLATFORM": "offscreen", "LANG": "C.UTF-8"}


def self_test(app: Path, out: Path, env: dict[str, str], user: list[str] | None = None) -> dict:
    """Run `--self-test` from the user's home folder, as a launcher would (not from the source tree)."""
    started = time.perf_counter()
    done = subprocess.run([*(user or []), str(app), "--self-test", str(out)], env=env, cwd=env["HOME"],
                          capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0, f"self-test failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    report = json.loads((out / "self-test.json").read_text())
    report["wall_s"] = wall
    return report


@pytest.mark.slow
def test_built_app_merges_the_demo_with_no_python_on_the_path(tmp_path):
    app = built_app()
    home = tmp_path / "home"
    env = bare_env(home, tmp_path / "empty-bin")
    assert shutil.which("python3", path=env["PATH"]) is None and shutil.which("python", path=env["PATH"]) is None

    first = self_test(app, tmp_path / "run1", env)
    assert first["ok"] and first["frozen"] and first["executable"] == str(app)
    check = first["check"]
    assert check["tensors"] == check["tensors_changed"] == 6  # the demo MLP: 3 weights + 3 biases, all merged
    assert 0.1 < check["merged_accuracy"] <= 1.0 and 0.1 < check["base_accuracy"] <= 1.0
    merged = tmp_path / "run1" / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    # the Numba kernels (merge kernels and analysis counters) and the engine's bytecode were cached in the
    # user's cache folder: nothing in the app folder, nothing in Numba's user-wide fallback
    cache = Path(first["numba_cache_dir"])
    assert cache.parent == home / ".cache" / "alloy" / "numba"
    assert first["numba_cache"]["index_files_before"] == 0 and first["numba_cache"]["index_files_after"] > 0
    assert {p.name.split("_")[0] for p in cache.iterdir()} >= {"kernels", "analysis"}
    assert not (home / ".cache" / "numba").exists()
    assert list((home / ".cache" / "alloy" / "pycache").rglob("*.pyc"))
    assert not list(APP_DIR.rglob("*.nbi")) and not list(APP_DIR.rglob("__pycache__"))

    second = self_test(app, tmp_path / "run2", env)  # the demo models and the kernels come from the caches
    assert second["ok"]
    assert second["numba_cache"]["index_files_before"] == first["numba_cache"]["index_files_after"]
    print(f"first run {first['wall_s']:.1f} s (demo trained, kernels compiled), second run {second['wall_s']:.1f} s; "
          f"engine loaded {second['seconds']['engine_loaded_since_process_start']:.1f} s after start")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to run the app as an unprivileged user) and setpriv")
def test_built_app_runs_from_a_folder_its_user_cannot_write():
    app = built_app()
    nobody = 65534
    base = Path(tempfile.mkdtemp(prefix="alloy-readonly-"))  # pytest's tmp_path is private to root
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir()
        os.chown(home, nobody, nobody)
        env = bare_env(home, base / "empty-bin")
        user = [shutil.which("setpriv"), f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups"]
        probe = subprocess.run([*user, "sh", "-c", f"touch '{APP_DIR}/probe'"], capture_output=True, text=True)
        if probe.returncode == 0:
            (APP_DIR / "probe").unlink()
            pytest.skip(f"{APP_DIR} is writable by an unprivileged user here")
        report = self_test(app, home / "out", env, user=user)
        assert report["ok"] and report["numba_cache"]["index_files_after"] > 0
        assert Path(report["numba_cache_dir"]).is_relative_to(home)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_built_app_is_clean_and_reports_its_start_time(tmp_path):
    app = built_app()
    internal = APP_DIR / "_internal"
    for tool in ("pytest", "_pytest", "hypothesis", "pytestqt", "pip"):  # built from a venv without test tools
        assert not (internal / tool).exists(), tool
    for plugin in ("platforms/libqoffscreen.so", "platforms/libqxcb.so", "imageformats/libqsvg.so"):
        assert (internal / "PySide6" / "Qt" / "plugins" / plugin).exists(), plugin
    assert (internal / "resources" / "icons" / "alloy.svg").is_file()
    for source in ("kernels/numba_backend.py", "analysis/counting.py"):  # the engine as source, for Numba's cache
        assert (internal / "merging" / source).is_file(), source
    size = sum(p.stat().st_size for p in APP_DIR.rglob("*") if p.is_file() and not p.is_symlink())
    env = bare_env(tmp_path / "home", tmp_path / "empty-bin")
    done = subprocess.run([str(app), "--startup-time"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"first paint: (\d+) ms after process start; engine loaded: (\d+) ms", done.stdout)
    assert match, done.stdout
    print(f"app folder {size / 2**20:.0f} MiB; first paint {match[1]} ms, engine loaded {match[2]} ms")
