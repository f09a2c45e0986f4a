"""The generated bad-input corpus dropped on the window: each file gets one inline message naming it.

A file the readers reject stays in the table as an error row whose summary cell
shows the reader's message (file, tensor, reason); a path that is not a
checkpoint at all is refused with a banner naming it. Nothing crashes, no
traceback is shown, and a pickle's code never runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import QSettings  # noqa: E402

from app.checkpoint_table import COL_FORMAT  # noqa: E402
from app.settings import AppSettings  # noqa: E402
from app.window import MainWindow  # noqa: E402
from app.workspace import STATUS_ERROR, STATUS_LOADING  # noqa: E402

try:
    from . import formats_corpus as corpus
except ImportError:
    import formats_corpus as corpus

TIMEOUT_MS = 120_000


@pytest.fixture()
def window(qtbot, tmp_path: Path):
    store = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(AppSettings(store))
    qtbot.addWidget(win)
    win.show()
    qtbot.waitUntil(lambda: win.engine_ready, timeout=TIMEOUT_MS)
    yield win
    win.shutdown()


def test_every_corpus_case_dropped_on_the_window_gets_one_clear_message(window: MainWindow, qtbot, tmp_path: Path, monkeypatch) -> None:
    banners: list[str] = []
    show = window.banner.show_message
    monkeypatch.setattr(window.banner, "show_message", lambda text, *a, **k: (banners.append(text), show(text, *a, **k)))

    expected = {}
    for case in corpus.all_cases():
        folder = tmp_path / case.id
        folder.mkdir()
        expected[case.id] = case.build(folder)
    window.add_paths([e.open for e in expected.values()])
    qtbot.waitUntil(lambda: all(e.status != STATUS_LOADING for e in window.entries), timeout=TIMEOUT_MS)

    rows = {entry.path: entry for entry in window.entries}
    refused = []
    for case_id, expect in expected.items():
        entry = rows.get(expect.open)
        if entry is None:  # not a checkpoint at all: refused with a banner naming it
            [text] = [b for b in banners if str(expect.names) in b]
            refused.append(case_id)
        else:
            assert entry.status == STATUS_ERROR, case_id
            text = window.table_model.index(window.table_model.row_of(entry), COL_FORMAT).data()
            assert text == entry.error, case_id
        assert str(expect.names) in text, (case_id, text)
        if expect.tensor is not None:
            assert f"tensor '{expect.tensor}'" in text, (case_id, text)
        if expect.message is not None:
            assert expect.message in text, (case_id, text)
        assert "Traceback" not in text and "\n" not in text.strip(), (case_id, text)
        if expect.must_not_exist is not None:
            assert not expect.must_not_exist.exists(), f"{case_id}: the pickle's code ran"
    assert len(rows) + len(refused) == len(expected)
    assert sorted(refused) == ["empty-folder", "not-a-checkpoint"]
    assert window.start_merge() is None  # a merge with error rows is refused, not attempted
