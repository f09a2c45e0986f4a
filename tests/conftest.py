"""Shared fixtures: offscreen Qt, isolated caches and Hub settings, small checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's caches or Hub token."""
    home = tmp_path_factory.getbasetemp() / "user-dirs"
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    if "ALLOY_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("ALLOY_CACHE_DIR", str(home / "cache"))


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory: pytest.TempPathFactory):
    """The demo models, built once per test session."""
    from merging.demo import build_demo_workspace

    return build_demo_workspace(tmp_path_factory.mktemp("demo") / "ws")


def write_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A Hugging Face-style folder with model.safetensors (+ config.json)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def random_family(n_models: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 0.1) -> tuple[dict, list[dict]]:
    """A base state dict and n fine-tunes near it (floats of several shapes, an int buffer)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (17, 8), "layers.0.w": (8, 8), "layers.0.b": (8,), "layers.1.w": (6, 8), "head.w": (3, 6), "scalar": ()}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    base["bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    fts = []
    for _ in range(n_models):
        ft = {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v.clone() for k, v in base.items()}
        fts.append(ft)
    return base, fts
