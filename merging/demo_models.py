"""The demo models: tiny digit classifiers, their data split and their evaluation.

The demo workspace (`merging.demo`) trains these on scikit-learn's bundled
8×8 digits, so the app, the README tables and the tests can show real merges
without downloading anything. Evaluation lives here so that a merged state
dict (from any method) can be scored the same way as the models it came from.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .errors import CheckpointError

IMAGE_SIZE = 8
NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.25

#: Task name -> the digits it classifies. The fine-tunes are trained on one task each.
TASKS: dict[str, tuple[int, ...]] = {
    "0-3": (0, 1, 2, 3),
    "4-6": (4, 5, 6),
    "7-9": (7, 8, 9),
}

MLP_ARCH = "AlloyDigitsMLP"
RESNET_ARCH = "AlloyDigitsResNet"


# -- data -------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsSplit:
    """A fixed train/test split of the digits; images are (n, 64) floats in [0, 1]."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@functools.lru_cache(maxsize=1)
def digits_split() -> DigitsSplit:
    """The bundled digits (no download), split 75/25 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return DigitsSplit(
        torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)
    )


def task_mask(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Boolean mask of the samples whose label belongs to `task`."""
    return torch.isin(labels, torch.tensor(TASKS[task], dtype=labels.dtype))


# -- modules ------------------------------------------------------------------


class DigitsMLP(nn.Module):
    """64 → hidden… → 10 with ReLU; parameters are `layers.{0,2,4…}.weight/bias`."""

    def __init__(self, input_size: int = IMAGE_SIZE * IMAGE_SIZE, hidden_sizes: tuple[int, ...] = (128, 128),
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        sizes = [input_size, *hidden_sizes]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block, with the same parameter names."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class DigitsResNet(nn.Module):
    """A tiny ResNet for 1×8×8 inputs with torchvision naming (conv1, bn1, layerN.M.*, fc).

    Stage 1 keeps the resolution, every later stage halves it and starts with a
    projection shortcut (`downsample.0/1`), so the model has both kinds of
    residual block a permutation spec must handle.
    """

    def __init__(self, in_channels: int = 1, stage_channels: tuple[int, ...] = (16, 32),
                 blocks_per_stage: tuple[int, ...] = (1, 1), num_classes: int = NUM_CLASSES):
        super().__init__()
        if len(stage_channels) != len(blocks_per_stage):
            raise ValueError("stage_channels and blocks_per_stage must have the same length")
        width = stage_channels[0]
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        for index, (channels, blocks) in enumerate(zip(stage_channels, blocks_per_stage), start=1):
            stage = []
            for block in range(blocks):
                stride = 2 if index > 1 and block == 0 else 1
                stage.append(BasicBlock(width, channels, stride))
                width = channels
            setattr(self, f"layer{index}", nn.Sequential(*stage))
        self.num_stages = len(stage_channels)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1, IMAGE_SIZE, IMAGE_SIZE)
        x = F.relu(self.bn1(self.conv1(x)))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- configs ------------------------------------------------------------------


def mlp_config(hidden_sizes: tuple[int, ...] = (128, 128)) -> dict[str, Any]:
    """config.json content for a DigitsMLP (the fields `build_module` reads)."""
    return {
        "architectures": [MLP_ARCH],
        "model_type": "alloy-digits-mlp",
        "input_size": IMAGE_SIZE * IMAGE_SIZE,
        "hidden_sizes": list(hidden_sizes),
        "num_classes": NUM_CLASSES,
        "image_size": IMAGE_SIZE,
        "torch_dtype": "float32",
    }


def resnet_config(stage_channels: tuple[int, ...] = (16, 32), blocks_per_stage: tuple[int, ...] = (1, 1)) -> dict[str, Any]:
    """config.json content for a DigitsResNet."""
    return {
        "architectures": [RESNET_ARCH],
        "model_type": "alloy-digits-resnet",
        "in_channels": 1,
        "stage_channels": list(stage_channels),
        "blocks_per_stage": list(blocks_per_stage),
        "num_classes": NUM_CLASSES,
        "image_size": IMAGE_SIZE,
        "torch_dtype": "float32",
    }


def build_module(config: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised module for a demo config (uses torch's global RNG)."""
    arch = (config.get("architectures") or [None])[0]
    if arch == MLP_ARCH:
        return DigitsMLP(int(config["input_size"]), tuple(config["hidden_sizes"]), int(config["num_classes"]))
    if arch == RESNET_ARCH:
        return DigitsResNet(int(config["in_channels"]), tuple(config["stage_channels"]),
                            tuple(config["blocks_per_stage"]), int(config["num_classes"]))
    raise ValueError(f"not a demo model architecture: {arch!r} (expected {MLP_ARCH} or {RESNET_ARCH})")


def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Rebuild the config from tensor names and shapes, for state dicts without a config.json."""
    if "layers.0.weight" in state:
        indices = sorted(int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight"))
        shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in indices]
        return mlp_config(tuple(s[0] for s in shapes[:-1])) | {"input_size": shapes[0][1], "num_classes": shapes[-1][0]}
    if "conv1.weight" in state and "fc.weight" in state:
        channels, blocks = [], []
        stage = 1
        while f"layer{stage}.0.conv1.weight" in state:
            count = 0
            while f"layer{stage}.{count}.conv1.weight" in state:
                count += 1
            channels.append(int(state[f"layer{stage}.0.conv1.weight"].shape[0]))
            blocks.append(count)
            stage += 1
        config = resnet_config(tuple(channels), tuple(blocks))
        config["in_channels"] = int(state["conv1.weight"].shape[1])
        config["num_classes"] = int(state["fc.weight"].shape[0])
        return config
    raise ValueError("these tensors are not a demo model (no 'layers.0.weight' or 'conv1.weight' + 'fc.weight')")


# -- files ----------------------------------------------------------------------


def load_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a demo model folder (or of a `.safetensors` file) as a state dict."""
    from safetensors.torch import load_file

    path = Path(folder)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(file, "no such file; a demo model folder holds model.safetensors")
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(file, f"cannot read safetensors: {exc}") from None


def load_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder)
    file = (path if path.is_dir() else path.parent) / "config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(file, f"cannot read config.json: {exc}") from None


def load_module(state: Mapping[str, torch.Tensor] | str | Path, config: Mapping[str, Any] | None = None) -> nn.Module:
    """A demo module in eval mode holding `state` (a state dict, or a model folder).

    Float tensors are cast to float32 so merged outputs in bf16/fp16 score too.
    A missing `num_batches_tracked` is tolerated: it does not affect inference.
    """
    if isinstance(state, (str, Path)):
        if config is None:
            config = load_config(state)
        state = load_state(state)
    if config is None:
        config = infer_config(state)
    module = build_module(config)
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"state dict does not fit {config['architectures'][0]}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    fitted = {}
    for name, target in own.items():
        if name not in state:
            fitted[name] = target
            continue
        tensor = state[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        fitted[name] = tensor.detach().to("cpu", target.dtype)
    module.load_state_dict(fitted)
    return module.eval()


# -- evaluation -------------------------------------------------------------------


def recompute_batchnorm(module: nn.Module, x: torch.Tensor | None = None) -> nn.Module:
    """Reset BatchNorm running statistics from one pass over the training images.

    Interpolated BatchNorm networks carry statistics that no longer match their
    weights (variance collapse); recomputing them shows the barrier that is left.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return module
    if x is None:
        x = digits_split().train_x
    kept = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one full batch gives the exact statistics
    module.train()
    with torch.no_grad():
        module(x)
    for bn, (momentum, count) in zip(bns, kept):
        bn.momentum = momentum
        bn.num_batches_tracked.copy_(count)
    return module.eval()


@torch.no_grad()
def _logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def _fraction(flags: torch.Tensor) -> float:
    return int(flags.sum()) / max(int(flags.numel()), 1)


def evaluate(state: Mapping[str, torch.Tensor] | str | Path, config: Mapping[str, Any] | None = None,
             *, recompute_bn: bool = False) -> dict[str, Any]:
    """Test-split scores of a demo model: overall accuracy, each task's accuracy, their mean, the loss.

    Returns `{"accuracy", "loss", "task_accuracy": {task: acc}, "mean_task_accuracy"}`;
    a task's accuracy is the 10-way accuracy on the test images of its digits.
    """
    module = load_module(state, config)
    if recompute_bn:
        recompute_batchnorm(module)
    data = digits_split()
    logits = _logits(module, data.test_x)
    correct = logits.argmax(dim=1) == data.test_y
    tasks = {name: _fraction(correct[task_mask(data.test_y, name)]) for name in TASKS}
    return {
        "accuracy": _fraction(correct),
        "loss": float(F.cross_entropy(logits, data.test_y)),
        "task_accuracy": tasks,
        "mean_task_accuracy": sum(tasks.values()) / len(tasks),
    }


def loss(state: Mapping[str, torch.Tensor] | str | Path, config: Mapping[str, Any] | None = None,
         *, split: str = "test", recompute_bn: bool = False) -> float:
    """Mean cross-entropy on the test (or train) split; the quantity of the loss-barrier plot."""
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', not {split!r}")
    module = load_module(state, config)
    if recompute_bn:
        recompute_batchnorm(module)
    data = digits_split()
    x, y = (data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y)
    return float(F.cross_entropy(_logits(module, x), y))
