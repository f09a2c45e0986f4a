"""The About dialog (versions and licences read from metadata) and the first-run welcome, offscreen."""

from __future__ import annotations

import email.message
import platform
from importlib import metadata

import pytest
from PySide6.QtCore import QSettings, Qt, qVersion

from app import about, welcome
from app.settings import AppSettings


def meta(**fields) -> email.message.Message:
    """Distribution metadata as importlib.metadata returns it (an email message; Classifier may repeat)."""
    msg = email.message.Message()
    for key, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            msg[key.replace("_", "-")] = v
    return msg


@pytest.fixture
def settings(tmp_path) -> AppSettings:
    return AppSettings(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))


# -- licences from metadata ----------------------------------------------------------------------


def test_licence_expression_wins_over_the_other_fields():
    m = meta(License_Expression="BSD-3-Clause AND MIT", License="BSD", Classifier=["License :: OSI Approved :: MIT License"])
    assert about.licence_of(m) == "BSD-3-Clause AND MIT"


def test_short_licence_field_is_used_and_a_pasted_text_is_not():
    assert about.licence_of(meta(License="Apache-2.0")) == "Apache-2.0"
    pasted = "Copyright (c) 2001-2002 Enthought, Inc.\nAll rights reserved.\n\nRedistribution and use..."
    m = meta(License=pasted, Classifier=["Programming Language :: Python", "License :: OSI Approved :: BSD License"])
    assert about.licence_of(m) == "BSD License"
    assert about.licence_of(meta(License="UNKNOWN")) == about.NOT_STATED


def test_classifiers_only_and_nothing_at_all():
    m = meta(Classifier=["License :: OSI Approved :: Apache Software License", "License :: OSI Approved :: MIT License",
                         "License :: OSI Approved :: MIT License"])
    assert about.licence_of(m) == "Apache Software License / MIT License"
    assert about.licence_of(meta(Name="x")) == about.NOT_STATED


def test_components_match_the_installed_metadata():
    rows = {c.name: c for c in about.bundled_components()}
    assert rows["Python"].version.startswith(platform.python_version())
    assert rows["Qt"].version == qVersion()
    for shown, dist in about.BUNDLED:
        md = metadata.metadata(dist)
        assert rows[shown].version == md["Version"], shown
        # the slow, obvious reading of the same metadata
        expected = md.get("License-Expression")
        if not expected:
            field = md.get("License") or ""
            if field and "\n" not in field and len(field) <= 100:
                expected = field
            else:
                expected = " / ".join(dict.fromkeys(
                    c.rsplit("::", 1)[1].strip() for c in md.get_all("Classifier") or [] if c.startswith("License ::")))
        assert rows[shown].licence == expected, shown
    # the pinned versions' declared licences, spelled out
    assert rows["PyTorch"].licence.startswith("Apache-2.0 AND")
    assert rows["Numba"].licence == "BSD"
    assert rows["SciPy"].licence == "BSD License"
    assert rows["PySide6 (Qt for Python)"].licence == rows["Qt"].licence == "LGPL-3.0-only OR GPL-2.0-only OR GPL-3.0-only"


def test_missing_distribution_is_reported_not_raised():
    c = about.distribution_component("Nothing", "no-such-distribution-alloy-test")
    assert c.version == about.NOT_INSTALLED and c.licence == ""
    assert "not installed" in about.licence_text("no-such-distribution-alloy-test")


def test_about_dialog_shows_versions_and_licence_texts(qtbot):
    from merging import __version__

    dialog = about.AboutDialog()
    qtbot.addWidget(dialog)
    dialog.show()
    assert f"Alloy {__version__}" in dialog.title.text()
    assert "Apache-2.0" in dialog.summary.text()  # Alloy's own licence, from its metadata
    table = dialog.table
    assert table.rowCount() == len(about.BUNDLED) + 2
    shown = {table.item(r, 0).text(): (table.item(r, 1).text(), table.item(r, 2).text()) for r in range(table.rowCount())}
    assert shown["PyTorch"] == (metadata.version("torch"), metadata.metadata("torch")["License-Expression"])
    assert shown["safetensors"][0] == metadata.version("safetensors")
    dialog.select("safetensors")
    text = dialog.licence_view.toPlainText()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    dialog.select("Python")
    assert dialog.licence_view.toPlainText() == "Python: PSF-2.0"
    dialog.select("Qt")  # the PySide6 wheel ships no licence file: say so, do not show an empty box
    assert "does not ship a licence file" in dialog.licence_view.toPlainText()


# -- the first-run welcome -----------------------------------------------------------------------


def test_welcome_is_off_under_pytest_and_with_the_variable(settings, monkeypatch):
    assert welcome.should_show_welcome(settings) is False  # PYTEST_CURRENT_TEST is set
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.delenv(welcome.DISABLE_ENV, raising=False)
    assert welcome.should_show_welcome(settings) is True
    monkeypatch.setenv(welcome.DISABLE_ENV, "1")
    assert welcome.should_show_welcome(settings) is False
    assert welcome.show_welcome_if_first_run(None, settings) is None
    assert settings.value(welcome.SHOWN_KEY) is None  # not shown, so not remembered


def test_welcome_shows_once_and_opens_the_demo(qtbot, settings, monkeypatch, tmp_path):
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.delenv(welcome.DISABLE_ENV, raising=False)
    asked: list[str] = []
    dialog = welcome.show_welcome_if_first_run(None, settings, open_demo=lambda: asked.append("demo"))
    assert dialog is not None
    qtbot.addWidget(dialog)
    assert dialog.isVisible()
    text = dialog.text.text()
    assert "Open demo" in text and "Drag and drop" in text
    # remembered at once, in the settings file, for the next start
    reread = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    assert welcome._truthy(reread.value(welcome.SHOWN_KEY))
    assert welcome.show_welcome_if_first_run(None, settings) is None
    qtbot.mouseClick(dialog.demo_button, Qt.MouseButton.LeftButton)
    assert asked == ["demo"]
    assert not dialog.isVisible()


def test_welcome_close_does_not_open_the_demo(qtbot, settings, monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.delenv(welcome.DISABLE_ENV, raising=False)
    asked: list[str] = []
    dialog = welcome.show_welcome_if_first_run(None, settings, open_demo=lambda: asked.append("demo"))
    qtbot.addWidget(dialog)
    qtbot.mouseClick(dialog.close_button, Qt.MouseButton.LeftButton)
    assert asked == [] and not dialog.isVisible()


# -- the window's Help menu --------------------------------------------------------------------------


def test_help_about_opens_the_dialog(qtbot, settings):
    from app.window import MainWindow

    window = MainWindow(settings, load_engine=False)
    qtbot.addWidget(window)
    [help_menu] = [a.menu() for a in window.menuBar().actions() if a.text().replace("&", "") == "Help"]
    [action] = [a for a in help_menu.actions() if a.text() == "About Alloy"]
    action.trigger()
    dialog = window.about_window
    qtbot.addWidget(dialog)
    assert isinstance(dialog, about.AboutDialog) and dialog.isVisible()
    assert dialog.parent() is window
