"""Render the app icon (resources/icons/alloy.svg) to the PNG sizes, .ico and .icns the packages need.

Desktops pick a pixel size from the hicolor theme, Windows wants an .ico and
macOS an .icns; all come from the one SVG through Qt's own renderer and image
writers, so no extra imaging library is needed. Run it after editing the SVG:

    QT_QPA_PLATFORM=offscreen .venv/bin/python packaging/render_icons.py
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ICONS = ROOT / "resources" / "icons"
SOURCE = ICONS / "alloy.svg"
PNG_SIZES = (16, 24, 32, 48, 64, 128, 256, 512)
ICO_SIZES = (16, 24, 32, 48, 64, 128, 256)
# macOS icon types that hold PNG data, with their pixel size (the @2x types repeat a size).
ICNS_TYPES = ((b"icp4", 16), (b"icp5", 32), (b"icp6", 64), (b"ic07", 128), (b"ic08", 256), (b"ic09", 512),
              (b"ic10", 1024), (b"ic11", 32), (b"ic12", 64), (b"ic13", 256), (b"ic14", 512))


def render(size: int):
    """The SVG drawn into a transparent size x size image."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(str(SOURCE))
    if not renderer.isValid():
        raise SystemExit(f"{SOURCE}: not a valid SVG")
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    return image


def png_bytes(image) -> bytes:
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice

    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")
    buffer.close()
    return bytes(data)


def write_ico(path: Path, pngs: dict[int, bytes]) -> None:
    """A multi-size .ico of PNG entries (Qt's ico writer stores one image per file)."""
    header = struct.pack("<HHH", 0, 1, len(pngs))
    offset = len(header) + 16 * len(pngs)
    entries, blobs = b"", b""
    for size, data in sorted(pngs.items()):
        side = 0 if size >= 256 else size  # 0 means 256 in the directory entry
        entries += struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(data), offset + len(blobs))
        blobs += data
    path.write_bytes(header + entries + blobs)


def write_icns(path: Path, pngs: dict[int, bytes]) -> None:
    """An .icns of PNG entries, one per macOS icon type (Qt's icns writer stores a single size)."""
    body = b"".join(kind + struct.pack(">I", 8 + len(pngs[size])) + pngs[size] for kind, size in ICNS_TYPES)
    path.write_bytes(b"icns" + struct.pack(">I", 8 + len(body)) + body)


def png_path(size: int) -> Path:
    return ICONS / "png" / f"alloy-{size}.png"


def main() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication

    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # noqa: F841 - image plugins need it
    png_path(16).parent.mkdir(parents=True, exist_ok=True)
    for size in PNG_SIZES:
        if not render(size).save(str(png_path(size)), "PNG"):
            raise SystemExit(f"could not write {png_path(size)}")
    write_ico(ICONS / "alloy.ico", {size: png_path(size).read_bytes() if size in PNG_SIZES else png_bytes(render(size))
                                    for size in ICO_SIZES})
    write_icns(ICONS / "alloy.icns", {size: png_bytes(render(size)) for size in {s for _t, s in ICNS_TYPES}})
    print(f"wrote {len(PNG_SIZES)} PNGs, alloy.ico and alloy.icns under {ICONS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
