"""The demo workspace: real, deterministic, cached, atomically written models that merges can improve."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.nn import functional as F

from merging import demo
from merging import demo_models as dm
from merging.errors import AlloyError, CheckpointError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> demo.DemoWorkspace:
    return demo.build_demo_workspace(tmp_path_factory.mktemp("demo") / "workspace")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- slow, obvious references -------------------------------------------------------------


def _mlp_logits_ref(state: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    """Plain float64 NumPy forward pass: Linear, ReLU, ..., Linear."""
    indices = sorted(int(k.split(".")[1]) for k in state if k.endswith(".weight"))
    h = x.double().numpy()
    for j, i in enumerate(indices):
        h = h @ state[f"layers.{i}.weight"].double().numpy().T + state[f"layers.{i}.bias"].double().numpy()
        if j < len(indices) - 1:
            h = np.maximum(h, 0.0)
    return h


def _resnet_logits_ref(state: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    """torchvision BasicBlock semantics written out with float64 functional ops and the tensor names."""
    s = {k: v.double() for k, v in state.items()}

    def bn(h, name):
        shape = (1, -1, 1, 1)
        return ((h - s[f"{name}.running_mean"].reshape(shape)) / torch.sqrt(s[f"{name}.running_var"].reshape(shape) + 1e-5)
                * s[f"{name}.weight"].reshape(shape) + s[f"{name}.bias"].reshape(shape))

    h = x.double().reshape(-1, 1, 8, 8)
    h = torch.relu(bn(F.conv2d(h, s["conv1.weight"], padding=1), "bn1"))
    for block in ("layer1.0", "layer2.0"):
        stride = 1 if block == "layer1.0" else 2
        out = torch.relu(bn(F.conv2d(h, s[f"{block}.conv1.weight"], stride=stride, padding=1), f"{block}.bn1"))
        out = bn(F.conv2d(out, s[f"{block}.conv2.weight"], padding=1), f"{block}.bn2")
        if f"{block}.downsample.0.weight" in s:
            short = bn(F.conv2d(h, s[f"{block}.downsample.0.weight"], stride=stride), f"{block}.downsample.1")
        else:
            short = h
        h = torch.relu(out + short)
    h = h.mean(dim=(2, 3))
    return (h @ s["fc.weight"].T + s["fc.bias"]).numpy()


def _scores_ref(logits: np.ndarray, y: torch.Tensor) -> dict:
    y = y.numpy()
    correct = logits.argmax(1) == y
    shifted = logits - logits.max(1, keepdims=True)
    ce = np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(y)), y]
    tasks = {t: correct[np.isin(y, d)].mean() for t, d in dm.TASKS.items()}
    return {"accuracy": correct.mean(), "loss": ce.mean(), "task_accuracy": tasks}


def _lerp(a: dict, b: dict, alpha: float) -> dict:
    return {k: ((1 - alpha) * a[k].double() + alpha * b[k].double()).float() if a[k].is_floating_point() else a[k]
            for k in a}


# -- layout ---------------------------------------------------------------------------------


def test_layout_names_configs_and_dtypes(workspace):
    ws = workspace
    assert ws.root.is_dir() and demo.is_complete(ws.root)
    assert set(ws.finetunes) == {"0-3", "4-6", "7-9"}
    assert sorted(ws.models()) == sorted(
        ["base", "ft_0-3", "ft_4-6", "ft_7-9", "mlp_seed_a", "mlp_seed_b", "cnn_seed_a", "cnn_seed_b"])
    for folder in ws.models().values():
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        for name, tensor in load_file(str(folder / "model.safetensors")).items():
            expected = torch.int64 if name.endswith("num_batches_tracked") else torch.float32
            assert tensor.dtype == expected, (folder.name, name)

    mlp = load_file(str(ws.base / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in mlp.items()} == {
        "layers.0.weight": (128, 64), "layers.0.bias": (128,),
        "layers.2.weight": (128, 128), "layers.2.bias": (128,),
        "layers.4.weight": (10, 128), "layers.4.bias": (10,),
    }
    cnn = load_file(str(ws.cnn_seed_a / "model.safetensors"))
    for name in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
                 "layer1.0.conv2.weight", "layer1.0.bn2.bias", "layer2.0.downsample.0.weight",
                 "layer2.0.downsample.1.running_mean", "layer2.0.bn2.num_batches_tracked", "fc.weight", "fc.bias"):
        assert name in cnn, name
    assert "layer1.0.downsample.0.weight" not in cnn
    assert tuple(cnn["layer2.0.downsample.0.weight"].shape) == (64, 32, 1, 1)

    base_cfg = json.loads((ws.base / "config.json").read_text())
    assert base_cfg["architectures"] == ["AlloyDigitsMLP"] and base_cfg["hidden_sizes"] == [128, 128]
    assert "base_model" not in base_cfg
    for task, folder in ws.finetunes.items():
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["task"] == task and cfg["digits"] == list(dm.TASKS[task])
        assert folder.parent / cfg["base_model"] == ws.base
    cnn_cfg = json.loads((ws.cnn_seed_b / "config.json").read_text())
    assert cnn_cfg["architectures"] == ["AlloyDigitsResNet"] and cnn_cfg["stage_channels"] == [32, 64]
    assert dm.infer_config(cnn) == dm.resnet_config((32, 64), (1, 1))
    assert dm.infer_config(mlp) == dm.mlp_config((128, 128))


def test_recipe_is_mergekit_ties_with_relative_paths(workspace):
    recipe = yaml.safe_load(workspace.recipe.read_text())
    assert recipe["merge_method"] == "ties"
    assert recipe["dtype"] == "float32"
    assert recipe["parameters"] == {"density": 0.2, "lambda": 1.0}
    here = workspace.recipe.parent
    assert here / recipe["base_model"] == workspace.base
    assert [here / m["model"] for m in recipe["models"]] == list(workspace.finetunes.values())


def test_split_is_the_whole_dataset_scaled_to_unit_range():
    from sklearn.datasets import load_digits

    split = dm.digits_split()
    assert len(split.train_y) + len(split.test_y) == 1797 and len(split.test_y) == 450
    assert float(split.train_x.min()) == 0.0 and float(split.train_x.max()) == 1.0
    everything = np.concatenate([split.train_x.numpy(), split.test_x.numpy()]) * 16
    rows = sorted(map(tuple, np.rint(everything).astype(int).tolist()))
    assert rows == sorted(map(tuple, load_digits().data.astype(int).tolist()))
    totals = np.bincount(load_digits().target)
    assert np.all(np.abs(np.bincount(split.test_y.numpy()) - totals / 4) <= 1)  # stratified


# -- evaluation against the references ---------------------------------------------------------


def test_evaluate_and_loss_match_float64_references(workspace):
    split = dm.digits_split()
    for folder, ref in ((workspace.finetunes["4-6"], _mlp_logits_ref), (workspace.cnn_seed_a, _resnet_logits_ref)):
        state = dm.load_state(folder)
        want = _scores_ref(ref(state, split.test_x), split.test_y)
        got = dm.evaluate(folder)
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        for task in dm.TASKS:
            assert got["task_accuracy"][task] == pytest.approx(want["task_accuracy"][task], abs=1e-9)
        assert got["mean_task_accuracy"] == pytest.approx(np.mean(list(want["task_accuracy"].values())), abs=1e-9)
        assert dm.loss(state) == pytest.approx(want["loss"], rel=1e-4)  # config inferred from the names


def test_evaluate_accepts_half_precision_merged_outputs(workspace):
    state = dm.load_state(workspace.base)
    full = dm.evaluate(state)
    half = dm.evaluate({k: v.to(torch.bfloat16) for k, v in state.items()})
    assert abs(half["accuracy"] - full["accuracy"]) < 0.03
    with pytest.raises(ValueError, match="layers.4.weight"):
        dm.evaluate({k: v for k, v in state.items() if k != "layers.4.weight"}, dm.load_config(workspace.base))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        dm.load_state(workspace.root / "missing")


def test_saved_batchnorm_statistics_are_exact_training_statistics(workspace):
    state = dm.load_state(workspace.cnn_seed_b)
    x = dm.digits_split().train_x.double().reshape(-1, 1, 8, 8)
    h = F.conv2d(x, state["conv1.weight"].double(), padding=1)
    assert torch.allclose(state["bn1.running_mean"].double(), h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(state["bn1.running_var"].double(), h.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert int(state["bn1.num_batches_tracked"]) > 1  # the real step count is kept
    # recomputing them again changes nothing for an endpoint
    assert dm.loss(state, recompute_bn=True) == pytest.approx(dm.loss(state), rel=1e-4)


# -- what the merges need to show ---------------------------------------------------------------------


def test_finetunes_win_their_task_and_forget_the_others(workspace):
    base = dm.evaluate(workspace.base)
    assert 0.8 < base["accuracy"] < 0.95  # reasonable but improvable
    for task, folder in workspace.finetunes.items():
        ft = dm.evaluate(folder)["task_accuracy"]
        assert ft[task] >= base["task_accuracy"][task] + 0.02, task
        assert ft[task] > 0.95
        for other in dm.TASKS:
            if other != task:
                assert ft[other] < base["task_accuracy"][other] - 0.02, (task, other)


def test_task_arithmetic_beats_every_single_finetune(workspace):
    base = dm.load_state(workspace.base)
    fts = [dm.load_state(f) for f in workspace.finetunes.values()]
    best_single = max(dm.evaluate(f)["mean_task_accuracy"] for f in workspace.finetunes.values())
    base_score = dm.evaluate(base)["mean_task_accuracy"]
    for lam in (0.5, 1.0):
        merged = {k: (base[k].double() + lam * sum(f[k].double() - base[k].double() for f in fts)).float() for k in base}
        score = dm.evaluate(merged)["mean_task_accuracy"]
        assert score > best_single + 0.03, lam
        if lam == 0.5:
            assert score > base_score


def test_seed_pairs_differ_and_their_naive_midpoint_is_worse(workspace):
    families = ((workspace.mlp_seed_a, workspace.mlp_seed_b, (False,)),
                (workspace.cnn_seed_a, workspace.cnn_seed_b, (False, True)))  # BatchNorm: stored and recomputed stats
    for path_a, path_b, modes in families:
        a, b = dm.load_state(path_a), dm.load_state(path_b)
        score_a, score_b = dm.evaluate(a), dm.evaluate(b)
        assert score_a["accuracy"] > 0.95 and score_b["accuracy"] > 0.95
        first = "fc.weight" if "fc.weight" in a else "layers.0.weight"
        assert not torch.allclose(a[first], b[first], atol=1e-3)
        midpoint = _lerp(a, b, 0.5)
        for recompute in modes:
            ends = (score_a["loss"] + score_b["loss"]) / 2  # endpoints store exact statistics already
            middle = dm.loss(midpoint, recompute_bn=recompute)
            assert middle > ends + 0.3 and middle > 3 * ends, (path_a.name, recompute, middle, ends)


# -- determinism, caching, atomicity ---------------------------------------------------------------------


def test_two_builds_write_identical_bytes_and_restore_torch_state(workspace, tmp_path):
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    messages: list[str] = []
    again = demo.build_demo_workspace(tmp_path / "again", progress=messages.append)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), rng)
    assert messages[0].startswith("[1/9]") and messages[-1] == "demo workspace ready"

    first, second = _files(workspace.root), _files(again.root)
    assert sorted(first) == sorted(second)
    assert all(first[name] == second[name] for name in first)
    for name in workspace.models():
        a, b = dm.load_state(workspace.root / name), dm.load_state(again.root / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no staging left behind


def test_finished_workspace_is_reused_without_training(workspace, monkeypatch, tmp_path):
    def no_training(*args, **kwargs):
        raise AssertionError("a cached workspace must not be retrained")

    monkeypatch.setattr(demo, "_train", no_training)
    before = {p: p.stat().st_mtime_ns for p in workspace.root.rglob("*")}
    again = demo.build_demo_workspace(workspace.root)
    assert again == workspace
    assert {p: p.stat().st_mtime_ns for p in workspace.root.rglob("*")} == before

    # the default location comes from the environment, in this order
    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path / "cache"))
    assert demo.default_root() == tmp_path / "cache" / "demo-v1"
    (tmp_path / "cache").mkdir()
    os.symlink(workspace.root, tmp_path / "cache" / "demo-v1")
    assert demo.build_demo_workspace().base == tmp_path / "cache" / "demo-v1" / "base"
    monkeypatch.delenv("ALLOY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_root() == tmp_path / "xdg" / "alloy" / "demo-v1"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_root() == tmp_path / "home" / ".cache" / "alloy" / "demo-v1"


def _fake_builder(marker: str):
    def build(folder: Path, say) -> None:
        (folder / "marker.txt").write_text(marker)
    return build


def test_a_failed_build_leaves_nothing_and_stale_staging_is_removed(monkeypatch, tmp_path):
    def crash(folder: Path, say) -> None:
        (folder / "base").mkdir()
        (folder / "base" / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(demo, "_build_into", crash)
    with pytest.raises(RuntimeError, match="killed"):
        demo.build_demo_workspace(tmp_path / "ws")
    assert list(tmp_path.iterdir()) == []

    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmp_path / f".ws.tmp-{dead.pid}-abc123"
    (leftover / "base").mkdir(parents=True)
    assert not demo.is_complete(leftover)
    alive = tmp_path / f".ws.tmp-{os.getpid()}-zzz"  # a build still running in this process: kept
    alive.mkdir()
    monkeypatch.setattr(demo, "_build_into", _fake_builder("one"))
    demo.build_demo_workspace(tmp_path / "ws")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ws", alive.name])
    assert demo.is_complete(tmp_path / "ws")


def test_force_replaces_and_foreign_folders_are_never_overwritten(monkeypatch, tmp_path):
    root = tmp_path / "ws"
    monkeypatch.setattr(demo, "_build_into", _fake_builder("one"))
    demo.build_demo_workspace(root)
    monkeypatch.setattr(demo, "_build_into", _fake_builder("two"))
    demo.build_demo_workspace(root)
    assert (root / "marker.txt").read_text() == "one"
    demo.build_demo_workspace(root, force=True)
    assert (root / "marker.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]

    # an outdated stamp is rebuilt without force
    (root / demo.STAMP_NAME).write_text(json.dumps({"version": demo.DEMO_VERSION - 1}))
    monkeypatch.setattr(demo, "_build_into", _fake_builder("three"))
    demo.build_demo_workspace(root)
    assert (root / "marker.txt").read_text() == "three"

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    for force in (False, True):
        with pytest.raises(AlloyError, match="not a demo workspace"):
            demo.build_demo_workspace(foreign, force=force)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]


def test_command_line_prints_the_score_table(workspace, capsys):
    assert demo.main(["--out", str(workspace.root)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(lines) == set(workspace.models())
    base = dm.evaluate(workspace.base)
    assert lines["base"][1:] == [f"{base['task_accuracy'][t]:.3f}" for t in dm.TASKS] + [
        f"{base['mean_task_accuracy']:.3f}", f"{base['accuracy']:.3f}", f"{base['loss']:.3f}"]
