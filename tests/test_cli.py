"""`alloy` CLI: merge, inspect, and one-line errors with a non-zero exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_family, write_model
from merging.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def family(tmp_path: Path) -> Path:
    base, fts = random_family(2)
    write_model(tmp_path / "base", base, {"architectures": ["TinyNet"]})
    for i, ft in enumerate(fts):
        write_model(tmp_path / f"ft{i}", ft)
    (tmp_path / "r.yaml").write_text("merge_method: task_arithmetic\nbase_model: base\nmodels: [ft0, ft1]\nparameters: {lambda: 0.5}\n")
    return tmp_path


def test_merge_writes_output_and_summary(family: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["merge", str(family / "r.yaml"), "-o", str(family / "out"), "--out-dtype", "float16", "--shard-size", "200B", "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "merged 6 of 7 tensors" in out and str(family / "out") in out
    shards = sorted((family / "out").glob("model-*.safetensors"))
    assert len(shards) > 1
    merged = {}
    for s in shards:
        merged.update(load_file(str(s)))
    assert merged["layers.0.w"].dtype == torch.float16


def test_inspect_reports_format_and_architecture(family: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(family / "base"), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "format:        safetensors" in out
    assert "architecture:  TinyNet" in out
    assert "tensors:       7" in out
    assert "layers.0.w" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["inspect", "{d}/nope"], "no such file or folder"),
        (["merge", "{d}/missing.yaml", "-o", "{d}/o"], "cannot read recipe"),
        (["merge", "{d}/r.yaml", "-o", "{d}/o", "--shard-size", "lots"], "--shard-size"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(family: Path, capsys: pytest.CaptureFixture, argv: list[str], needle: str) -> None:
    rc = main([a.format(d=family) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1
    assert needle in err and err.startswith("alloy: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_console_entry_point_runs_as_a_process(family: Path) -> None:
    (family / "ft1" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    proc = subprocess.run(
        [sys.executable, "-m", "merging.cli", "merge", str(family / "r.yaml"), "-o", str(family / "out")],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "ft1" in proc.stderr
    assert not (family / "out").exists()
