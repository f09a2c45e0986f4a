"""The engine calls the window runs in workers: each is `fn(progress, cancel) -> result`.

Plain Python, no Qt: these only call `merging`'s public API and package its
answers for the panels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from merging.progress import CancelToken

from .workspace import ModelEntry, inspect_checkpoint

Progress = Callable[[Any], None]


def load_engine(progress: Progress, cancel: CancelToken) -> list[str]:
    """Import the heavy modules (torch, numba, the methods, pyqtgraph) off the GUI thread."""
    import merging.checkpoint  # noqa: F401
    import merging.executor  # noqa: F401
    import merging.export  # noqa: F401
    import merging.formats.detect  # noqa: F401
    import merging.recipe  # noqa: F401
    from merging.methods import method_names

    try:
        import merging.analysis  # noqa: F401
    except ImportError:
        pass
    import pyqtgraph  # noqa: F401  - numpy-heavy; no widgets are made here

    return method_names()


def warm_kernels(progress: Progress, cancel: CancelToken) -> bool:
    """Compile (or load from numba's cache) the CPU kernels, so the first merge does not pay for it."""
    try:
        from merging.kernels.numba_backend import warm_up
    except ImportError:
        return False
    warm_up()
    return True


def inspect_job(path: Path, base: Path | None) -> Callable[[Progress, CancelToken], ModelEntry | list[Path]]:
    """Summarise one dropped path; a folder of model folders answers with the folders inside it."""

    def run(progress: Progress, cancel: CancelToken) -> ModelEntry | list[Path]:
        from merging.errors import AlloyError

        from .workspace import is_not_a_checkpoint_error, model_folders_inside

        try:
            return inspect_checkpoint(path, base)
        except AlloyError as exc:
            if path.is_dir() and is_not_a_checkpoint_error(exc):
                inside = model_folders_inside(path)
                if inside:
                    return inside
            raise

    return run


# -- merge -----------------------------------------------------------------------------------


def merge_job(recipe: Any, out_dir: Path, *, shard_size: int, license: str | None, overwrite: bool):
    def run(progress: Progress, cancel: CancelToken):
        from merging.executor import run_merge

        return run_merge(recipe, out_dir, shard_size=shard_size, overwrite=overwrite, license=license,
                         progress=progress, cancel=cancel)

    return run


@dataclass
class AfterMerge:
    """What the summary shows beyond the executor's result: retention per model, demo accuracy."""

    retention: dict[str, float] = field(default_factory=dict)
    retention_note: str = ""
    analysis: Any = None  # the AnalysisResult holding retention per layer, for the Retention plot
    accuracy: dict[str, Any] | None = None  # demo models only: merged vs base scores


def after_merge_job(recipe: Any, output: Path, labels: list[str]):
    """Retention cos(τ_merged, τ_i) per model (analysis module) and, for the demo models, test accuracy."""

    def run(progress: Progress, cancel: CancelToken) -> AfterMerge:
        out = AfterMerge()
        if recipe.base_model is not None and recipe.alignment is None:
            try:
                out.analysis = retention(recipe, output, labels, progress, cancel)
                out.retention = {label: float(v) for label, v in zip(labels, out.analysis.retention("overall"))}
            except ImportError:
                out.retention_note = "retention needs the analysis module"
        elif recipe.base_model is None:
            out.retention_note = "retention is measured against a base model; this merge has none"
        else:
            out.retention_note = "retention is not measured for aligned merges"
        cancel.raise_if_cancelled()
        if is_demo_model(output):
            from merging import demo_models

            merged = demo_models.evaluate(output)
            base = demo_models.evaluate(recipe.base_model) if recipe.base_model is not None else None
            out.accuracy = {"merged": merged, "base": base}
        return out

    return run


def retention(recipe: Any, output: Path, labels: list[str], progress: Progress, cancel: CancelToken) -> Any:
    """The analysis with cos(τ_merged, τ_i), measured against the written output."""
    from merging.analysis import analyze
    from merging.checkpoint import open_checkpoint
    from merging.executor import open_inputs

    inputs = open_inputs(recipe, cancel=cancel)
    merged = open_checkpoint(output)
    try:
        assert inputs.base is not None
        result = analyze(inputs.base, inputs.models, densities=[0.5, 1.0], merged=merged, labels=labels,
                         progress=progress, cancel=cancel)
        return result
    finally:
        inputs.close()
        merged.close()


def is_demo_model(folder: Path) -> bool:
    """True for a model of the demo workspace (its config names the bundled digits data)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    training = cfg.get("training") if isinstance(cfg, dict) else None
    return isinstance(training, dict) and training.get("dataset") == "sklearn.datasets.load_digits"


# -- export ------------------------------------------------------------------------------------


def export_job(source: Path, target: Path, *, dtype: str | None, shard_size: int, overwrite: bool):
    """Re-write a merged folder with another dtype / shard size; recipe and card travel with it."""

    def run(progress: Progress, cancel: CancelToken) -> Path:
        from merging.checkpoint import open_checkpoint, parse_dtype
        from merging.export import CARD_FILE, MERGEKIT_FILE, RECIPE_FILE, export_checkpoint

        extra = {}
        for name in (RECIPE_FILE, CARD_FILE, MERGEKIT_FILE):
            f = Path(source) / name
            if f.is_file():
                extra[name] = f.read_text(encoding="utf-8")
        ck = open_checkpoint(source)
        try:
            return export_checkpoint(
                ck, target, dtype=parse_dtype(dtype) if dtype else None, shard_size=shard_size, overwrite=overwrite,
                extra_files=extra, progress=progress, cancel=cancel,
            )
        finally:
            ck.close()

    return run


# -- demo ----------------------------------------------------------------------------------------


def demo_job(root: Path | None):
    def run(progress: Progress, cancel: CancelToken):
        from merging.demo import build_demo_workspace

        return build_demo_workspace(root, progress=lambda message: progress(message))

    return run
