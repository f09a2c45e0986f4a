"""Print the app's runtime requirements (pyproject's `dependencies`), one per line, for the build venv.

The packaged app must bundle what users install, nothing more: no test tools,
no editable install of Alloy itself (PyInstaller takes `merging` and `app`
from the source tree).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def runtime_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    return list(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"])


if __name__ == "__main__":
    sys.stdout.write("".join(f"{req}\n" for req in runtime_requirements()))
