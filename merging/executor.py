"""Streams a merge tensor by tensor: read -> method -> cast -> write.

Peak memory is a few tensors (the one being merged and the one being read
ahead by a loader thread), never a model. Progress is reported per tensor and a
cancellation token is honoured between tensors; the output folder appears only
when complete (see `export.StagedFolder`).
"""

from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .buffers import BufferPool
from .checkpoint import Checkpoint, TensorInfo, open_checkpoint, parse_dtype
from .errors import AlloyError, CheckpointError, RecipeError
from .export import StagedFolder, copy_side_files, write_recipe_files
from .formats.validate import check_finite
from .formats.safetensors_writer import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedSafetensorsWriter
from .layers import LayerMap
from .methods.base import MergeMethod, TensorJob
from .progress import CancelToken, ProgressCallback, ProgressTracker
from .recipe import Recipe

PREFETCH_DEPTH = 2


@dataclass
class MergeInputs:
    """The opened checkpoints of a recipe; `reference` sets the tensor names and order."""

    base: Checkpoint | None
    models: list[Checkpoint]
    alignment: list[Any] = field(default_factory=list)  # MatchResult per aligned model

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    @property
    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base is not None else []) + self.models

    def close(self) -> None:
        for ck in self.all:
            ck.close()


@dataclass
class MergePlan:
    """What will be merged, copied and written, decided before any tensor data is read."""

    recipe: Recipe
    inputs: MergeInputs
    method: MergeMethod
    device: torch.device
    compute_dtype: torch.dtype
    order: list[str]
    merged: set[str]
    copy_from: dict[str, Checkpoint]
    out_infos: dict[str, TensorInfo]
    layers: LayerMap
    warnings: list[str]

    @property
    def input_bytes(self) -> int:
        return sum(self.tensor_input_bytes(n) for n in self.order)

    def tensor_input_bytes(self, name: str) -> int:
        if name in self.merged:
            return sum(ck.info(name).nbytes for ck in self.inputs.all)
        return self.copy_from[name].info(name).nbytes

    @property
    def output_bytes(self) -> int:
        return sum(i.nbytes for i in self.out_infos.values())


@dataclass
class MergeResult:
    output: Path
    seconds: float
    tensors: int
    merged_tensors: int
    input_bytes: int
    output_bytes: int
    files: list[str]
    warnings: list[str]

    @property
    def throughput_gbps(self) -> float:
        return self.input_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device", "cuda was asked for but no CUDA GPU is available (use auto or cpu)")
    return torch.device(name)


def open_inputs(recipe: Recipe, *, progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> MergeInputs:
    """Open every checkpoint of the recipe (headers only), aligning them when asked."""
    base = open_checkpoint(recipe.base_model) if recipe.base_model is not None else None
    models = []
    for m in recipe.models:
        if m.lora is not None:
            models.append(open_checkpoint(m.lora, base=m.path))
        else:
            models.append(open_checkpoint(m.path, base=base))
    inputs = MergeInputs(base, models)
    if recipe.alignment is not None:
        _align_inputs(recipe, inputs, progress=progress, cancel=cancel)
    return inputs


def _align_inputs(recipe: Recipe, inputs: MergeInputs, *, progress: ProgressCallback | None, cancel: CancelToken | None) -> None:
    """Replace each model by its permutation-aligned view (weight matching against the reference)."""
    from .alignment import align_checkpoint

    al = recipe.alignment
    assert al is not None
    reference = open_checkpoint(al.reference) if al.reference is not None else inputs.models[0]
    seed = recipe.seed if al.seed is None else al.seed
    device = str(resolve_device(recipe.device))
    tracker = ProgressTracker("align", len(inputs.models), 0, progress, cancel)

    def poll(_stage: str, _done: int, _total: int) -> None:
        if cancel is not None:
            cancel.raise_if_cancelled()

    for i, model in enumerate(inputs.models):
        if al.reference is None and i == 0:
            tracker.step(message=f"{model.path.name} is the reference")
            continue
        aligned, result = align_checkpoint(reference, model, al.spec, seed=seed, device=device, max_rounds=al.max_rounds, progress=poll)
        inputs.models[i] = aligned
        inputs.alignment.append(result)
        tracker.step(message=f"aligned {model.path.name}")


def plan_merge(recipe: Recipe, inputs: MergeInputs, *, out_dtype: str | None = None, device: str | None = None) -> MergePlan:
    """Check that the inputs fit together and decide each tensor's fate; reads headers only."""
    method = recipe.method
    reference = inputs.reference
    out_name = out_dtype if out_dtype is not None else recipe.out_dtype
    try:
        forced_out = parse_dtype(out_name) if out_name is not None else None
        compute = parse_dtype(recipe.dtype)
    except ValueError as exc:
        raise RecipeError("out_dtype" if out_dtype else "dtype", str(exc), recipe.source) from None
    warnings: list[str] = []
    order = reference.names()
    merged: set[str] = set()
    copy_from: dict[str, Checkpoint] = {}
    out_infos: dict[str, TensorInfo] = {}
    for name in order:
        ref_info = reference.info(name)
        missing = []
        for ck in inputs.all:
            if ck is reference:
                continue
            if name not in ck:
                missing.append(ck)
                continue
            info = ck.info(name)
            if info.shape != ref_info.shape:
                raise CheckpointError(
                    ck.path, f"shape {list(info.shape)} differs from {list(ref_info.shape)} in {reference.path}", tensor=name
                )
            if info.is_float != ref_info.is_float:
                raise CheckpointError(
                    ck.path, f"dtype {info.dtype} does not match {ref_info.dtype} in {reference.path}", tensor=name
                )
        if missing:
            if recipe.missing_tensors == "base" and inputs.base is not None and name in inputs.base:
                warnings.append(f"tensor '{name}' is missing from {', '.join(str(m.path) for m in missing)}; copied from the base")
                copy_from[name] = inputs.base
            else:
                raise CheckpointError(
                    missing[0].path,
                    f"tensor missing (it is in {reference.path}); set `missing_tensors: base` to copy it from the base",
                    tensor=name,
                )
        elif ref_info.is_float:
            merged.add(name)
        else:
            copy_from[name] = reference
        dtype = forced_out if (forced_out is not None and ref_info.is_float) else ref_info.dtype
        out_infos[name] = TensorInfo(name, ref_info.shape, dtype)
    names = set(order)
    for ck in inputs.all:
        extra = [n for n in ck.names() if n not in names]
        if extra:
            shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
            warnings.append(f"{ck.path}: {len(extra)} tensors not in {reference.path} were left out ({shown})")
    return MergePlan(
        recipe=recipe,
        inputs=inputs,
        method=method,
        device=resolve_device(device or recipe.device),
        compute_dtype=compute,
        order=order,
        merged=merged,
        copy_from=copy_from,
        out_infos=out_infos,
        layers=LayerMap(order),
        warnings=warnings,
    )


def _backend_for(plan: MergePlan) -> Any:
    try:
        from .kernels import get_backend
    except ImportError:
        return None
    return get_backend(plan.recipe.backend, plan.device.type)


def _check_finite(tensor: torch.Tensor, ck: Checkpoint, name: str) -> None:
    try:
        check_finite(tensor, ck.path, name)
    except CheckpointError as exc:
        raise CheckpointError(ck.path, f"{exc.detail} (set `allow_nonfinite: true` to merge anyway)", tensor=name) from None


class _Loader:
    """Reads the inputs of upcoming tensors on one background thread (reads overlap compute).

    For a merged tensor it returns the base and the models already converted to
    the compute dtype and stacked into one buffer the job owns, so the compute
    thread does no copying of its own. Inputs stored in the compute dtype are
    read straight into that buffer. `check_finite` is off for the later passes
    of a multi-pass merge: the first pass has vouched for the values, and the
    change detection catches a file rewritten in between.
    """

    def __init__(self, plan: MergePlan, pool: BufferPool, *, check_finite: bool = True):
        self.plan = plan
        self.pool = pool
        self.pin = plan.device.type == "cuda"
        self.check = check_finite and not plan.recipe.allow_nonfinite

    def _empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.pin:  # torch caches pinned host memory itself
            return torch.empty(shape, dtype=self.plan.compute_dtype, pin_memory=True)
        return self.pool.empty(shape, self.plan.compute_dtype)

    def load(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor] | torch.Tensor:
        plan = self.plan
        if name not in plan.merged:
            return plan.copy_from[name].get(name)
        shape = plan.out_infos[name].shape
        base = None
        if plan.inputs.base is not None:
            base = self._empty(shape)
            self._read(plan.inputs.base, name, base)
        stacked = self._empty((len(plan.inputs.models), *shape))
        for i, ck in enumerate(plan.inputs.models):
            self._read(ck, name, stacked[i])
        return base, stacked

    def _read(self, ck: Checkpoint, name: str, out: torch.Tensor) -> None:
        ck.read_into(name, out)
        if self.check:
            _check_finite(out, ck, name)

    def stream(self, names: list[str], cancel: CancelToken | None) -> Iterator[tuple[str, Any]]:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alloy-read")
        queue: deque[tuple[str, Future]] = deque()
        upcoming = iter(names)
        try:
            for name in upcoming:
                queue.append((name, pool.submit(self.load, name)))
                if len(queue) >= PREFETCH_DEPTH:
                    break
            while queue:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                name, future = queue.popleft()
                data = future.result()
                nxt = next(upcoming, None)
                if nxt is not None:
                    queue.append((nxt, pool.submit(self.load, nxt)))
                yield name, data
                del data
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class _BackgroundWriter:
    """Hands finished tensors to the output writer on its own thread (writes overlap compute)."""

    def __init__(self, writer: ShardedSafetensorsWriter, depth: int = PREFETCH_DEPTH):
        self.writer = writer
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alloy-write")
        self.pending: deque[Future] = deque()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self.writer.write, name, tensor))

    def close(self) -> list[Path]:
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown(wait=True)
        return self.writer.close()

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.writer.abort()


def _make_job(plan: MergePlan, name: str, data: tuple[torch.Tensor | None, torch.Tensor], backend: Any, stats: Any) -> TensorJob:
    base, stacked = data
    dev, dt = plan.device, plan.compute_dtype
    n = int(stacked.shape[0])
    params = plan.recipe.resolve(name, plan.layers)
    weights = params.get("weight", [1.0] * n)
    weights_t = torch.tensor(weights if isinstance(weights, list) else [weights] * n, dtype=dt, device=dev)
    return TensorJob(
        name=name,
        base=None if base is None else base.to(device=dev, non_blocking=True),
        models=stacked.to(device=dev, non_blocking=True),
        weights=weights_t,
        params=params,
        seed=plan.recipe.seed,
        backend=backend,
        stats=stats,
        model_ids=tuple(range(n)),
    )


def _run_method(plan: MergePlan, job: TensorJob) -> torch.Tensor:
    try:
        out = plan.method.merge(job)
    except AlloyError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise AlloyError(f"tensor '{job.name}': {plan.method.name} failed: {exc}") from exc
    if tuple(out.shape) != plan.out_infos[job.name].shape:
        raise AlloyError(f"tensor '{job.name}': {plan.method.name} returned shape {tuple(out.shape)}")
    return out


def _prepare(plan: MergePlan, backend: Any, pool: BufferPool, progress: ProgressCallback | None, cancel: CancelToken | None) -> tuple[Any, bool]:
    """Run the method's whole-model pass(es) for global scope, if it needs them.

    Returns the method's statistics and whether a pass read (and checked) every merged tensor.
    """
    names = [n for n in plan.order if n in plan.merged]
    if not names:
        return None, False
    params = plan.recipe.resolve(names[0], plan.layers)
    if not plan.method.needs_prepare(params):
        return None, False
    bytes_total = sum(plan.tensor_input_bytes(n) for n in names)
    checked = False  # a pass has read every merged tensor and checked its values

    def stream() -> Iterator[TensorJob]:
        nonlocal checked
        loader = _Loader(plan, pool, check_finite=not checked)
        tracker = ProgressTracker("prepare", len(names), bytes_total, progress, cancel)
        for name, data in loader.stream(names, cancel):
            yield _make_job(plan, name, data, backend, None)
            tracker.step(plan.tensor_input_bytes(name), name)
        checked = True

    stats = plan.method.prepare(params, stream)
    return stats, checked


def iter_merged_tensors(
    plan_or_recipe: MergePlan | Recipe,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    include_copies: bool = False,
) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor]]:
    """Yield `(name, base, merged)` per tensor in output order, writing nothing (a dry run).

    `merged` is in the compute dtype on the compute device; copies (integer
    buffers) are yielded only with `include_copies`, with `base` None.
    """
    plan = plan_or_recipe if isinstance(plan_or_recipe, MergePlan) else plan_merge(plan_or_recipe, open_inputs(plan_or_recipe))
    backend = _backend_for(plan)
    pool = BufferPool()  # shared by every pass, so later passes reuse the first one's memory
    stats, checked = _prepare(plan, backend, pool, progress, cancel)
    tracker = ProgressTracker("merge", len(plan.order), plan.input_bytes, progress, cancel)
    for name, data in _Loader(plan, pool, check_finite=not checked).stream(plan.order, cancel):
        if name in plan.merged:
            job = _make_job(plan, name, data, backend, stats)
            yield name, job.base, _run_method(plan, job)
        elif include_copies:
            yield name, None, data
        tracker.step(plan.tensor_input_bytes(name), name)


def _file_identities(inputs: MergeInputs) -> dict[Path, tuple[int, int]]:
    ids = {}
    for ck in inputs.all:
        for f in ck.files():
            try:
                st = f.stat()
            except OSError:
                continue
            ids[f] = (st.st_size, st.st_mtime_ns)
    return ids


def _check_unchanged(before: dict[Path, tuple[int, int]]) -> None:
    for f, ident in before.items():
        try:
            st = f.stat()
            now = (st.st_size, st.st_mtime_ns)
        except OSError:
            now = None
        if now != ident:
            raise CheckpointError(f, "changed on disk during the merge; the output was discarded (run the merge again)")


def run_merge(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    out_dtype: str | None = None,
    shard_size: int = DEFAULT_SHARD_BYTES,
    device: str | None = None,
    overwrite: bool = False,
    license: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    on_plan: Callable[[MergePlan], None] | None = None,
) -> MergeResult:
    """Merge as the recipe says and export to `out_dir` (complete, or nothing at all)."""
    started = time.perf_counter()
    inputs = open_inputs(recipe, progress=progress, cancel=cancel)
    try:
        identities = _file_identities(inputs)
        plan = plan_merge(recipe, inputs, out_dtype=out_dtype, device=device)
        if on_plan is not None:
            on_plan(plan)
        written_recipe = _recipe_as_run(recipe, out_dtype, device)
        planned = [PlannedTensor(n, plan.out_infos[n].shape, plan.out_infos[n].dtype) for n in plan.order]
        metadata = {"alloy_recipe": json.dumps(written_recipe.to_dict(), sort_keys=True)}
        with StagedFolder(out_dir, overwrite=overwrite) as staged:
            assert staged.path is not None
            writer = _BackgroundWriter(ShardedSafetensorsWriter(staged.path, planned, max_shard_bytes=shard_size, metadata=metadata))
            try:
                for name, _base, tensor in iter_merged_tensors(plan, progress=progress, cancel=cancel, include_copies=True):
                    writer.write(name, tensor.to(device="cpu", dtype=plan.out_infos[name].dtype))
                    del tensor, _base
                files = [p.name for p in writer.close()]
            except BaseException:
                writer.abort()
                raise
            side = _side_file_source(recipe, inputs)
            files += copy_side_files(side, staged.path)
            write_recipe_files(staged.path, written_recipe, license=license, checkpoint_config=inputs.reference.config())
            files += ["alloy_recipe.yaml", "README.md"]
            _check_unchanged(identities)
            target = staged.commit()
        return MergeResult(
            output=target,
            seconds=time.perf_counter() - started,
            tensors=len(plan.order),
            merged_tensors=len(plan.merged),
            input_bytes=plan.input_bytes,
            output_bytes=plan.output_bytes,
            files=sorted(files),
            warnings=plan.warnings,
        )
    finally:
        inputs.close()


def _side_file_source(recipe: Recipe, inputs: MergeInputs) -> Path | None:
    if recipe.copy_files_from == "base":
        ck = inputs.base if inputs.base is not None else inputs.models[0]
    else:
        ck = inputs.models[int(recipe.copy_files_from)]
    folder = getattr(ck, "source_folder", None) or ck.folder
    return folder


def _recipe_as_run(recipe: Recipe, out_dtype: str | None, device: str | None) -> Recipe:
    """The recipe saved beside the output: command-line overrides folded in."""
    import dataclasses

    changes: dict[str, Any] = {}
    if out_dtype is not None:
        changes["out_dtype"] = out_dtype
    if device is not None:
        changes["device"] = device
    return dataclasses.replace(recipe, **changes) if changes else recipe
