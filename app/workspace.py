"""What the window holds, as plain data: the checkpoint rows and the merge settings.

Nothing here imports Qt, so the mapping between the table/panels and a
`merging.recipe.Recipe` is tested without a window. The engine does every
check and every computation; this module only gathers what the user chose and
hands it over (and back, when a recipe is opened).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLE_BASE = "base"
ROLE_FINETUNED = "fine-tuned"
ROLES = (ROLE_BASE, ROLE_FINETUNED)

STATUS_LOADING = "loading"
STATUS_READY = "ready"
STATUS_ERROR = "error"

# Files the checkpoint readers accept by name; anything else is sniffed by content.
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
RECIPE_SUFFIXES = (".yaml", ".yml")

# config.json / adapter_config.json keys that name the model a checkpoint was derived from.
_REFERENCE_KEYS = ("base_model", "base_model_name_or_path", "_name_or_path", "parent_model")


@dataclass
class ModelEntry:
    """One row of the checkpoint table."""

    path: Path
    status: str = STATUS_LOADING
    format: str = ""
    num_params: int | None = None
    dtypes: dict[str, int] = field(default_factory=dict)
    architecture: str | None = None
    size_bytes: int | None = None
    layer_count: int | None = None
    role: str = ROLE_FINETUNED
    role_chosen: bool = False  # the user (or a recipe) set the role: never guess over it
    parameters: dict[str, Any] = field(default_factory=dict)  # the model's own recipe parameters
    error: str | None = None
    references: tuple[str, ...] = ()  # what this model says it was derived from
    is_adapter: bool = False
    lora_base: Path | None = None  # recipe `base+adapter` syntax: the model the adapter applies to

    @property
    def name(self) -> str:
        if self.path.is_file() and self.path.parent.name and self.path.stem in ("model", "pytorch_model", "adapter_model"):
            return f"{self.path.parent.name}/{self.path.name}"
        return self.path.name or str(self.path)

    @property
    def dtype_label(self) -> str:
        """The most common dtype first: 'float32' or 'bfloat16 + int64'."""
        ordered = sorted(self.dtypes.items(), key=lambda kv: (-kv[1], kv[0]))
        return " + ".join(name for name, _ in ordered)

    @property
    def ready(self) -> bool:
        return self.status == STATUS_READY

    def weight(self, default: float = 1.0) -> float:
        value = self.parameters.get("weight", default)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def looks_like_checkpoint(path: Path) -> bool:
    """Cheap test on drop: folders and known suffixes go to the reader, the rest is sniffed."""
    if path.is_dir():
        return True
    name = path.name.lower()
    if name.endswith(CHECKPOINT_SUFFIXES) or name.endswith(".index.json") or name == "adapter_config.json":
        return True
    try:
        from merging.formats.detect import sniff
    except ImportError:  # pragma: no cover - the engine always has it
        return False
    return sniff(path) is not None


def is_recipe_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in RECIPE_SUFFIXES


def not_a_checkpoint_message(path: Path) -> str:
    try:
        from merging.formats.detect import NOT_A_CHECKPOINT
    except ImportError:  # pragma: no cover
        NOT_A_CHECKPOINT = "not a checkpoint"
    return f"{path}: {NOT_A_CHECKPOINT}"


def is_not_a_checkpoint_error(error: BaseException) -> bool:
    """True for the reader's 'this is no checkpoint at all' answer (refused, not listed as a bad row)."""
    try:
        from merging.formats.detect import NOT_A_CHECKPOINT
    except ImportError:  # pragma: no cover
        return False
    return NOT_A_CHECKPOINT in str(error)


def model_folders_inside(folder: Path) -> list[Path]:
    """Sub-folders of a dropped folder that hold weights (dropping a folder of models adds each)."""
    found = []
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    for child in children:
        try:
            names = [p.name for p in child.iterdir() if p.is_file()]
        except OSError:
            continue
        if any(n.lower().endswith(CHECKPOINT_SUFFIXES) or n == "adapter_config.json" for n in names):
            found.append(child)
    return found


def inspect_checkpoint(path: Path, base: Path | None = None) -> ModelEntry:
    """Open a checkpoint lazily (headers only) and summarise it for the table.

    Raises the engine's AlloyError when the file is not a checkpoint at all;
    any other reader error comes back inside the entry (shown inline).
    """
    from merging.checkpoint import open_checkpoint
    from merging.errors import AlloyError
    from merging.layers import LayerMap

    entry = ModelEntry(path=Path(path))
    adapter_config = _adapter_config(entry.path)
    entry.is_adapter = adapter_config is not None
    entry.references = _references(entry.path, adapter_config)
    try:
        ck = open_checkpoint(entry.path, base=base if entry.is_adapter else None)
    except AlloyError as exc:
        if is_not_a_checkpoint_error(exc):
            raise
        entry.status = STATUS_ERROR
        entry.error = str(exc)
        entry.format = "lora" if entry.is_adapter else ""
        entry.size_bytes = _disk_size([entry.path]) if entry.path.exists() else None
        return entry
    try:
        entry.format = ck.format
        entry.num_params = ck.num_params
        entry.dtypes = ck.dtypes()
        entry.layer_count = LayerMap(ck.names()).count
        try:
            entry.architecture = ck.architecture()
        except AlloyError:
            entry.architecture = None
        files = _adapter_files(entry.path) if entry.is_adapter else ck.files()
        entry.size_bytes = _disk_size(files or [entry.path])
        entry.status = STATUS_READY
    finally:
        ck.close()
    return entry


def _adapter_config(path: Path) -> dict | None:
    folder = path if path.is_dir() else path.parent
    cfg = folder / "adapter_config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _adapter_files(path: Path) -> list[Path]:
    folder = path if path.is_dir() else path.parent
    return [p for p in folder.iterdir() if p.is_file()]


def _references(path: Path, adapter_config: dict | None) -> tuple[str, ...]:
    refs: list[str] = []
    folder = path if path.is_dir() else path.parent
    sources = [adapter_config or {}]
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if isinstance(cfg, dict):
            sources.append(cfg)
    except (OSError, ValueError):
        pass
    for source in sources:
        for key in _REFERENCE_KEYS:
            value = source.get(key)
            values = value if isinstance(value, list) else [value]
            refs.extend(v.strip() for v in values if isinstance(v, str) and v.strip())
    return tuple(dict.fromkeys(refs))


def _disk_size(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        try:
            if p.is_dir():
                total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            else:
                total += p.stat().st_size
        except OSError:
            continue
    return total


def _names_for(entry: ModelEntry) -> set[str]:
    """The ways another model's config may name this one."""
    names = {str(entry.path), entry.path.name}
    folder = entry.path if entry.path.is_dir() else entry.path.parent
    names |= {str(folder), folder.name}
    try:
        names.add(str(entry.path.resolve()))
        names.add(str(folder.resolve()))
    except OSError:
        pass
    return {n for n in names if n and n != "."}


def _mentions(reference: str, names: set[str]) -> bool:
    ref = reference.replace("\\", "/").rstrip("/")
    return ref in names or ref.rsplit("/", 1)[-1] in names


def guess_base(entries: list[ModelEntry]) -> int | None:
    """Index of the one model the others name as their origin (config.json / adapter_config.json), or None."""
    votes: dict[int, int] = {}
    for i, candidate in enumerate(entries):
        names = _names_for(candidate)
        for j, other in enumerate(entries):
            if i == j or other.path == candidate.path:
                continue
            if any(_mentions(ref, names) for ref in other.references):
                votes[i] = votes.get(i, 0) + 1
    if not votes:
        return None
    best = max(votes.values())
    winners = [i for i, v in votes.items() if v == best]
    return winners[0] if len(winners) == 1 else None


def apply_base_guess(entries: list[ModelEntry]) -> int | None:
    """Mark the guessed base unless the user already chose roles; returns the base row or None."""
    if any(e.role_chosen for e in entries):
        return next((i for i, e in enumerate(entries) if e.role == ROLE_BASE), None)
    guess = guess_base(entries)
    if guess is None:
        return next((i for i, e in enumerate(entries) if e.role == ROLE_BASE), None)
    for i, e in enumerate(entries):
        e.role = ROLE_BASE if i == guess else ROLE_FINETUNED
    return guess


def set_role(entries: list[ModelEntry], row: int, role: str) -> None:
    """One base at most: making a row the base demotes the previous base."""
    if role not in ROLES:
        raise ValueError(f"unknown role '{role}'")
    for i, e in enumerate(entries):
        if i == row:
            e.role = role
        elif role == ROLE_BASE and e.role == ROLE_BASE:
            e.role = ROLE_FINETUNED
        e.role_chosen = True


# -- the merge settings ---------------------------------------------------------------


@dataclass
class AlignmentSettings:
    spec: str = "mlp"
    reference: Path | None = None
    seed: int | None = None
    max_rounds: int = 100


@dataclass
class MergeSettings:
    """Everything in the method panel; `parameters` holds only values that differ from the method's defaults
    or were read from a recipe, so a recipe round-trips unchanged."""

    method: str = "task_arithmetic"
    parameters: dict[str, Any] = field(default_factory=dict)
    overrides: list[Any] = field(default_factory=list)  # merging.recipe.Override
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    dtype: str = "float32"
    out_dtype: str | None = None
    alignment: AlignmentSettings | None = None
    # recipe keys the window does not edit, carried through so saving keeps them
    allow_nonfinite: bool = False
    missing_tensors: str = "error"
    copy_files_from: str = "base"
    name: str | None = None


def build_recipe(entries: list[ModelEntry], settings: MergeSettings, *, validate: bool = True):
    """The engine's Recipe for the table and panel; RecipeError (from the engine) says what is missing."""
    from merging.errors import RecipeError
    from merging.recipe import Alignment, ModelInput, Recipe

    base = next((e for e in entries if e.role == ROLE_BASE), None)
    models = []
    for e in entries:
        if e is base:
            continue
        if e.lora_base is not None:
            models.append(ModelInput(e.lora_base, copy.deepcopy(e.parameters), lora=e.path))
        else:
            models.append(ModelInput(e.path, copy.deepcopy(e.parameters)))
    if not entries:
        raise RecipeError("models", "add checkpoints first (drop files or folders on the window, or File ▸ Add)")
    alignment = None
    if settings.alignment is not None:
        a = settings.alignment
        alignment = Alignment(spec=a.spec, reference=a.reference, seed=a.seed, max_rounds=a.max_rounds)
    recipe = Recipe(
        merge_method=settings.method,
        models=models,
        base_model=None if base is None else base.path,
        parameters=copy.deepcopy(settings.parameters),
        dtype=settings.dtype,
        out_dtype=settings.out_dtype,
        seed=settings.seed,
        device=settings.device,
        backend=settings.backend,
        overrides=copy.deepcopy(settings.overrides),
        alignment=alignment,
        allow_nonfinite=settings.allow_nonfinite,
        missing_tensors=settings.missing_tensors,
        copy_files_from=settings.copy_files_from,
        name=settings.name,
    )
    return recipe.validate() if validate else recipe


def from_recipe(recipe) -> tuple[list[ModelEntry], MergeSettings]:
    """Rows (still to be inspected) and settings for an opened recipe."""
    entries: list[ModelEntry] = []
    if recipe.base_model is not None:
        entries.append(ModelEntry(path=Path(recipe.base_model), role=ROLE_BASE, role_chosen=True))
    for m in recipe.models:
        if m.lora is not None:
            entries.append(ModelEntry(path=Path(m.lora), parameters=copy.deepcopy(m.parameters), lora_base=Path(m.path), role_chosen=True))
        else:
            entries.append(ModelEntry(path=Path(m.path), parameters=copy.deepcopy(m.parameters), role_chosen=True))
    alignment = None
    if recipe.alignment is not None:
        a = recipe.alignment
        alignment = AlignmentSettings(spec=a.spec, reference=a.reference, seed=a.seed, max_rounds=a.max_rounds)
    settings = MergeSettings(
        method=recipe.merge_method,
        parameters=copy.deepcopy(recipe.parameters),
        overrides=copy.deepcopy(recipe.overrides),
        seed=recipe.seed,
        device=recipe.device,
        backend=recipe.backend,
        dtype=recipe.dtype,
        out_dtype=recipe.out_dtype,
        alignment=alignment,
        allow_nonfinite=recipe.allow_nonfinite,
        missing_tensors=recipe.missing_tensors,
        copy_files_from=recipe.copy_files_from,
        name=recipe.name,
    )
    return entries, settings


def switch_method(settings: MergeSettings, method_name: str) -> None:
    """Keep the parameters the new method also has (density, lambda ...), drop the others."""
    from merging.methods import get_method

    method = get_method(method_name)
    known = {p.name for p in method.params} | {a for p in method.params for a in p.aliases}
    settings.method = method_name
    settings.parameters = {k: v for k, v in settings.parameters.items() if k in known}
    kept = []
    for ov in settings.overrides:
        params = {k: v for k, v in ov.parameters.items() if k in known}
        if params:
            ov.parameters = params
            kept.append(ov)
    settings.overrides = kept


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


def human_count(n: int | None) -> str:
    if n is None:
        return ""
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= limit:
            return f"{n / limit:.2f}{suffix}"
    return str(n)


def human_seconds(s: float | None) -> str:
    if s is None:
        return "…"
    s = max(0.0, float(s))
    if s < 10:
        return f"{s:.1f} s"
    if s < 90:
        return f"{s:.0f} s"
    minutes, seconds = divmod(int(round(s)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
