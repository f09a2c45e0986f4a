"""The demo workspace: small real models, trained here in seconds, for the app and the tests.

`build_demo_workspace()` trains, on scikit-learn's bundled digits (no download):
- a multi-task family sharing a base: `base` (an MLP trained briefly on all
  ten digits) and three fine-tunes continued from it, one per task of
  `demo_models.TASKS`, for task arithmetic / TIES / DARE / PCB;
- an alignment family with no shared base: two MLPs and two tiny ResNets,
  each pair trained from different seeds, for permutation alignment.

Every model is a Hugging Face-style folder (`model.safetensors` + `config.json`).
The build is deterministic (same bytes on the same machine), cached behind a
completion stamp, and atomic: it happens in a temporary folder that is renamed
into place only when complete.

Run `python -m merging.demo [--out DIR] [--force]` to build it and print scores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.nn import functional as F

from . import demo_models as dm
from .errors import AlloyError

#: Bump when anything that changes the workspace's bytes changes; old caches are rebuilt.
DEMO_VERSION = 1
STAMP_NAME = ".alloy-demo-complete.json"
RECIPE_NAME = "demo_ties.yaml"
BASE_NAME = "base"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainSpec:
    """One training run: epochs of shuffled mini-batch SGD with momentum."""

    seed: int
    epochs: int
    lr: float
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 0.0


# The recipe of the whole workspace. The numbers were chosen so that the base is
# decent but improvable, each fine-tune wins its own task and forgets the
# others, task arithmetic of the three beats every single fine-tune on mean task
# accuracy, and the naively interpolated seed pairs lose clearly at the midpoint.
MLP_HIDDEN = (128, 128)
RESNET_CHANNELS = (32, 64)
RESNET_BLOCKS = (1, 1)
BASE_SPEC = TrainSpec(seed=1, epochs=2, lr=0.04)
FINETUNE_SPECS = {
    "0-3": TrainSpec(seed=11, epochs=5, lr=0.002),
    "4-6": TrainSpec(seed=12, epochs=5, lr=0.002),
    "7-9": TrainSpec(seed=13, epochs=5, lr=0.002),
}
SEED_MLP_SPECS = {"a": TrainSpec(seed=101, epochs=10, lr=0.05), "b": TrainSpec(seed=202, epochs=10, lr=0.05)}
SEED_CNN_SPECS = {"a": TrainSpec(seed=301, epochs=6, lr=0.05), "b": TrainSpec(seed=402, epochs=6, lr=0.05)}


@dataclass(frozen=True)
class DemoWorkspace:
    """Paths of a built demo workspace; `finetunes` maps task name -> model folder."""

    root: Path
    base: Path
    finetunes: dict[str, Path]
    recipe: Path
    mlp_seed_a: Path
    mlp_seed_b: Path
    cnn_seed_a: Path
    cnn_seed_b: Path

    @classmethod
    def at(cls, root: Path) -> "DemoWorkspace":
        """The workspace layout under `root` (whether or not it is built)."""
        root = Path(root)
        return cls(
            root=root,
            base=root / BASE_NAME,
            finetunes={task: root / finetune_name(task) for task in dm.TASKS},
            recipe=root / RECIPE_NAME,
            mlp_seed_a=root / "mlp_seed_a",
            mlp_seed_b=root / "mlp_seed_b",
            cnn_seed_a=root / "cnn_seed_a",
            cnn_seed_b=root / "cnn_seed_b",
        )

    def models(self) -> dict[str, Path]:
        """Every model folder by its folder name, multi-task family first."""
        folders = [self.base, *self.finetunes.values(), self.mlp_seed_a, self.mlp_seed_b, self.cnn_seed_a, self.cnn_seed_b]
        return {p.name: p for p in folders}


def finetune_name(task: str) -> str:
    return f"ft_{task}"


def default_root() -> Path:
    """`$ALLOY_CACHE_DIR`, else `$XDG_CACHE_HOME/alloy`, else `~/.cache/alloy`; then `demo-v<N>`."""
    cache = os.environ.get("ALLOY_CACHE_DIR")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = os.path.join(xdg, "alloy") if xdg else os.path.join(Path.home(), ".cache", "alloy")
    return Path(cache) / f"demo-v{DEMO_VERSION}"


def is_complete(root: Path) -> bool:
    """True when `root` holds a finished workspace of the current version."""
    try:
        stamp = json.loads((Path(root) / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("version") == DEMO_VERSION


def build_demo_workspace(root: Path | None = None, *, force: bool = False,
                         progress: Progress | None = None) -> DemoWorkspace:
    """Build the demo workspace at `root` (default: `default_root()`), or reuse a finished one.

    Training runs single-threaded with deterministic algorithms, so two builds on
    one machine write identical bytes; the process-wide torch settings (threads,
    determinism, global RNG) are restored afterwards. `force` rebuilds a finished
    workspace; a folder that is not a demo workspace is never overwritten.
    """
    root = Path(root) if root is not None else default_root()
    say = progress or (lambda message: None)
    if root.exists() and is_complete(root) and not force:
        say(f"using the demo workspace at {root}")
        return DemoWorkspace.at(root)
    if root.exists() and not root.is_dir():
        raise AlloyError(f"{root}: exists and is not a folder; choose another place for the demo workspace")
    if root.is_dir() and any(root.iterdir()) and not (root / STAMP_NAME).exists():
        raise AlloyError(f"{root}: folder is not empty and is not a demo workspace; choose an empty or new folder")

    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # not mkdtemp: the workspace gets the usual permissions, not 0700
    try:
        _build_into(staging, say)
        _write_json(staging / STAMP_NAME, {"version": DEMO_VERSION, "kind": "alloy-demo-workspace"})
        _move_into_place(staging, root, replace_complete=force)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    say("demo workspace ready")
    return DemoWorkspace.at(root)


# -- building -------------------------------------------------------------------------


def _build_into(folder: Path, say: Progress) -> None:
    data = dm.digits_split()
    steps = 2 + len(dm.TASKS) + len(SEED_MLP_SPECS) + len(SEED_CNN_SPECS)
    step = iter(range(1, steps + 1))
    with _deterministic_torch():
        mlp = dm.mlp_config(MLP_HIDDEN)
        say(f"[{next(step)}/{steps}] training the base MLP on all digits")
        base_state = _train(mlp, None, data.train_x, data.train_y, BASE_SPEC)
        _save(folder / BASE_NAME, base_state, mlp | {"task": "all", "digits": list(range(dm.NUM_CLASSES))}, BASE_SPEC)

        for task, spec in FINETUNE_SPECS.items():
            say(f"[{next(step)}/{steps}] fine-tuning the base on digits {task}")
            mask = dm.task_mask(data.train_y, task)
            state = _train(mlp, base_state, data.train_x[mask], data.train_y[mask], spec)
            extra = {"task": task, "digits": list(dm.TASKS[task]), "base_model": BASE_NAME}
            _save(folder / finetune_name(task), state, mlp | extra, spec)

        for tag, spec in SEED_MLP_SPECS.items():
            say(f"[{next(step)}/{steps}] training MLP seed {tag} on all digits")
            state = _train(mlp, None, data.train_x, data.train_y, spec)
            _save(folder / f"mlp_seed_{tag}", state, mlp | {"task": "all", "digits": list(range(10))}, spec)

        cnn = dm.resnet_config(RESNET_CHANNELS, RESNET_BLOCKS)
        for tag, spec in SEED_CNN_SPECS.items():
            say(f"[{next(step)}/{steps}] training ResNet seed {tag} on all digits")
            state = _train(cnn, None, data.train_x, data.train_y, spec)
            _save(folder / f"cnn_seed_{tag}", state, cnn | {"task": "all", "digits": list(range(10))}, spec)
    say(f"[{next(step)}/{steps}] writing the TIES recipe")
    _write_recipe(folder / RECIPE_NAME)


def _train(config: dict[str, Any], start: dict[str, torch.Tensor] | None, x: torch.Tensor, y: torch.Tensor,
           spec: TrainSpec) -> dict[str, torch.Tensor]:
    """Train a fresh module (or one loaded from `start`) and return its state dict.

    The seed fixes the initialisation and the batch order; nothing else is random.
    """
    torch.manual_seed(spec.seed)
    module = dm.build_module(config)
    if start is not None:
        module.load_state_dict(start)
    optimizer = torch.optim.SGD(module.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    order = torch.Generator().manual_seed(spec.seed)
    module.train()
    for _ in range(spec.epochs):
        for batch in torch.randperm(len(x), generator=order).split(spec.batch_size):
            if len(batch) < 2:  # BatchNorm cannot train on a single sample
                continue
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(x[batch]), y[batch]).backward()
            optimizer.step()
    dm.recompute_batchnorm(module, x)  # store exact statistics of the training images, not a running estimate
    return {name: tensor.detach().clone().contiguous() for name, tensor in module.state_dict().items()}


@contextmanager
def _deterministic_torch() -> Iterator[None]:
    """One thread, deterministic kernels, a private RNG stream; all restored on exit."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _save(folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any], spec: TrainSpec) -> None:
    from safetensors.torch import save

    folder.mkdir(parents=True)
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    (folder / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
    training = {"dataset": "sklearn.datasets.load_digits", "seed": spec.seed, "epochs": spec.epochs,
                "lr": spec.lr, "batch_size": spec.batch_size, "momentum": spec.momentum}
    _write_json(folder / "config.json", config | {"training": training})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_recipe(path: Path) -> None:
    lines = [
        "# TIES merge of the three digit-task fine-tunes of the demo workspace.",
        "# mergekit schema; model paths are relative to this file.",
        "merge_method: ties",
        f"base_model: {BASE_NAME}",
        "models:",
        *(f"  - model: {finetune_name(task)}" for task in dm.TASKS),
        "parameters:",
        "  density: 0.2",
        "  lambda: 1.0",
        "dtype: float32",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- atomic placement -----------------------------------------------------------------


def _move_into_place(staging: Path, root: Path, *, replace_complete: bool) -> None:
    """Rename the finished build onto `root`; an outdated or forced-over workspace is moved aside first.

    If another process finished the same workspace meanwhile (and this is not a
    forced rebuild), its copy is kept: the bytes are the same.
    """
    if is_complete(root) and not replace_complete:
        return
    old = None
    if root.exists():
        if not root.is_dir() or (any(root.iterdir()) and not (root / STAMP_NAME).exists()):
            raise AlloyError(f"{root}: appeared during the build and is not a demo workspace; not replacing it")
        old = root.parent / f".{root.name}.old-{os.getpid()}-{staging.name.rsplit('-', 1)[-1]}"
        os.replace(root, old)
    try:
        os.replace(staging, root)
    except OSError:
        if is_complete(root):
            return  # a concurrent build won the race; its bytes are the same
        if old is not None and not root.exists():
            os.replace(old, root)  # put the previous workspace back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(root: Path) -> None:
    """Delete leftovers of builds that were killed (their process is gone)."""
    prefix = f".{root.name}."
    for path in root.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        parts = path.name[len(prefix):].split("-")
        if len(parts) < 2 or parts[0] not in ("tmp", "old") or not parts[1].isdigit():
            continue
        if not _process_alive(int(parts[1])):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# -- command line -------------------------------------------------------------------------


def score_table(workspace: DemoWorkspace) -> str:
    """A plain-text table of every model's test accuracy, per task and overall, and its loss."""
    tasks = list(dm.TASKS)
    header = ["model", *(f"acc {t}" for t in tasks), "mean task", "overall", "loss"]
    rows = [header]
    for name, folder in workspace.models().items():
        s = dm.evaluate(folder)
        rows.append([name, *(f"{s['task_accuracy'][t]:.3f}" for t in tasks),
                     f"{s['mean_task_accuracy']:.3f}", f"{s['accuracy']:.3f}", f"{s['loss']:.3f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merging.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"workspace folder (default: {default_root()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished workspace exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        workspace = build_demo_workspace(args.out, force=args.force, progress=lambda m: print(m, file=sys.stderr))
    except AlloyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"demo workspace: {workspace.root} ({time.perf_counter() - start:.1f} s)")
    print(score_table(workspace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
