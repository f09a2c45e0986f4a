"""Recipe: the whole merge as data, read from and written to YAML.

The schema is mergekit's (`merge_method`, `base_model`, `models[].model`,
`models[].parameters`, `parameters`, `dtype`, `out_dtype`) so existing recipes
run unchanged. Alloy adds `seed`, `device`, `backend`, `overrides`,
`alignment`, `allow_nonfinite`, `missing_tensors` and `copy_files_from`.

A parameter value may be
- a scalar;
- a list of numbers, interpolated across the model's depth (mergekit's
  gradients);
- a list of `{filter: SUBSTRING, value: V}` entries, the first whose filter
  occurs in the tensor name wins and an entry without `filter` is the fallback
  (mergekit's conditional parameters).
Overrides add regex and layer-range rules: `overrides: [{match: REGEX,
layers: [FIRST, LAST], parameters: {...}}]`, later rules winning. Precedence
for one tensor: method default < `parameters` < matching overrides < the
model's own `parameters`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import parse_dtype
from .errors import RecipeError
from .layers import LayerMap, layer_index
from .methods import get_method, method_names
from .methods.base import MergeMethod

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "numba", "torch")
MISSING_POLICIES = ("error", "base")

# mergekit keys whose meaning Alloy does not implement: refused, never ignored.
_UNSUPPORTED_MERGEKIT_KEYS = {
    "slices": "layer slicing (frankenmerges) is not supported; list whole models under `models`",
    "modules": "per-module sub-recipes are not supported; use `overrides` with a regex",
    "tokenizer": "tokenizer merging is not supported; tokenizer files are copied from `copy_files_from`",
    "chat_template": "chat templates are not merged; edit tokenizer_config.json after export",
    "parameters_per_layer": "not a mergekit key; use a list value (gradient) or `overrides`",
}
_TOP_LEVEL_KEYS = {
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed", "device",
    "backend", "overrides", "alignment", "allow_nonfinite", "missing_tensors", "copy_files_from",
    "tokenizer_source", "name",
}


@dataclass
class ModelInput:
    """One input model: a path (file or folder) and its own parameters."""

    path: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    lora: Path | None = None  # mergekit's `model+adapter` syntax: adapter applied on `path`

    @property
    def label(self) -> str:
        name = self.path.name if self.path.name not in ("", ".") else str(self.path)
        return f"{name}+{self.lora.name}" if self.lora else name


@dataclass
class Override:
    """Parameters for the tensors whose name matches `match` and/or whose layer is in `layers`."""

    parameters: dict[str, Any]
    match: str | None = None
    layers: tuple[int, int] | None = None

    def applies(self, name: str, layer: int | None) -> bool:
        if self.match is not None and not re.search(self.match, name):
            return False
        if self.layers is not None:
            if layer is None or not (self.layers[0] <= layer <= self.layers[1]):
                return False
        return True


@dataclass
class Alignment:
    """Align every model to `reference` with a permutation spec before merging."""

    spec: str
    reference: Path | None = None  # None: the first model
    seed: int | None = None
    max_rounds: int = 100


@dataclass
class Recipe:
    merge_method: str
    models: list[ModelInput]
    base_model: Path | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    out_dtype: str | None = None
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    overrides: list[Override] = field(default_factory=list)
    alignment: Alignment | None = None
    allow_nonfinite: bool = False
    missing_tensors: str = "error"
    copy_files_from: str = "base"  # "base" or the index of a model ("0", "1", ...)
    name: str | None = None
    source: Path | None = None  # the file it was read from, for messages

    # -- checks -------------------------------------------------------------
    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def validate(self) -> "Recipe":
        """Raise RecipeError naming the first bad key; return self when all is well."""
        src = self.source
        if self.merge_method not in method_names():
            raise RecipeError("merge_method", f"unknown method '{self.merge_method}' (known: {', '.join(sorted(method_names()))})", src)
        method = self.method
        if not self.models:
            raise RecipeError("models", "at least one model is needed", src)
        if method.needs_base and self.base_model is None:
            raise RecipeError("base_model", f"method '{self.merge_method}' needs a base model", src)
        for key, choices in (("device", DEVICES), ("backend", BACKENDS), ("missing_tensors", MISSING_POLICIES)):
            value = getattr(self, key)
            if value not in choices:
                raise RecipeError(key, f"must be one of {', '.join(choices)}, not '{value}'", src)
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is None:
                continue
            try:
                dt = parse_dtype(value)
            except ValueError as exc:
                raise RecipeError(key, str(exc), src) from None
            if not dt.is_floating_point:
                raise RecipeError(key, f"must be a floating-point dtype, not '{value}'", src)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RecipeError("seed", f"must be a non-negative whole number, not {self.seed!r}", src)
        if self.copy_files_from != "base":
            if not (self.copy_files_from.isdigit() and int(self.copy_files_from) < len(self.models)):
                raise RecipeError("copy_files_from", f"must be 'base' or a model index below {len(self.models)}", src)
        elif self.base_model is None and method.needs_base:
            raise RecipeError("copy_files_from", "is 'base' but there is no base model", src)
        _check_params(method, self.parameters, "parameters", per_model=False, source=src)
        for i, model in enumerate(self.models):
            _check_params(method, model.parameters, f"models[{i}].parameters", per_model=True, source=src)
        for i, ov in enumerate(self.overrides):
            if ov.match is not None:
                try:
                    re.compile(ov.match)
                except re.error as exc:
                    raise RecipeError(f"overrides[{i}].match", f"bad regular expression: {exc}", src) from None
            _check_params(method, ov.parameters, f"overrides[{i}].parameters", per_model=False, source=src)
        return self

    # -- resolution -----------------------------------------------------------
    def resolve(self, tensor: str, layers: LayerMap) -> dict[str, Any]:
        """The method's parameters for one tensor; per-model ones as lists of length n."""
        method = self.method
        position = layers.position(tensor)
        index = layer_index(tensor)
        shared: dict[str, Any] = {p.name: p.default for p in method.params}
        for key, raw in self.parameters.items():
            shared[_canonical(method, key)] = _value_at(raw, tensor, position)
        for ov in self.overrides:
            if ov.applies(tensor, index):
                for key, raw in ov.parameters.items():
                    shared[_canonical(method, key)] = _value_at(raw, tensor, position)
        for p in method.params:
            if not p.per_model:
                continue
            values = []
            for model in self.models:
                own = {_canonical(method, k): v for k, v in model.parameters.items()}
                values.append(_value_at(own[p.name], tensor, position) if p.name in own else shared[p.name])
            shared[p.name] = values
        for p in method.params:
            value = shared[p.name]
            try:
                shared[p.name] = [p.coerce(v) for v in value] if isinstance(value, list) else p.coerce(value)
            except ValueError as exc:
                raise RecipeError(p.name, f"{exc} (for tensor '{tensor}')", self.source) from None
        return shared

    # -- YAML -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML; paths are written as given (absolute after loading)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = str(self.base_model)
        models = []
        for m in self.models:
            entry: dict[str, Any] = {"model": str(m.path) if m.lora is None else f"{m.path}+{m.lora}"}
            if m.parameters:
                entry["parameters"] = copy.deepcopy(m.parameters)
            models.append(entry)
        out["models"] = models
        if self.parameters:
            out["parameters"] = copy.deepcopy(self.parameters)
        out["dtype"] = self.dtype
        if self.out_dtype is not None:
            out["out_dtype"] = self.out_dtype
        out["seed"] = self.seed
        if self.device != "auto":
            out["device"] = self.device
        if self.backend != "auto":
            out["backend"] = self.backend
        if self.overrides:
            rules = []
            for ov in self.overrides:
                rule: dict[str, Any] = {}
                if ov.match is not None:
                    rule["match"] = ov.match
                if ov.layers is not None:
                    rule["layers"] = list(ov.layers)
                rule["parameters"] = copy.deepcopy(ov.parameters)
                rules.append(rule)
            out["overrides"] = rules
        if self.alignment is not None:
            al: dict[str, Any] = {"spec": self.alignment.spec}
            if self.alignment.reference is not None:
                al["reference"] = str(self.alignment.reference)
            if self.alignment.seed is not None:
                al["seed"] = self.alignment.seed
            if self.alignment.max_rounds != 100:
                al["max_rounds"] = self.alignment.max_rounds
            out["alignment"] = al
        if self.allow_nonfinite:
            out["allow_nonfinite"] = True
        if self.missing_tensors != "error":
            out["missing_tensors"] = self.missing_tensors
        if self.copy_files_from != "base":
            out["copy_files_from"] = self.copy_files_from
        if self.name:
            out["name"] = self.name
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    def is_mergekit_compatible(self) -> bool:
        """True when mergekit could run this recipe as written (no Alloy-only keys or methods)."""
        if self.merge_method not in ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs"):
            return False
        alloy_only = self.overrides or self.alignment or self.device != "auto" or self.backend != "auto"
        scope_global = _scalar_or_none(self.parameters.get("scope")) == "global"
        return not (alloy_only or scope_global or any(m.lora for m in self.models))

    def to_mergekit_yaml(self) -> str:
        data = self.to_dict()
        for key in ("seed", "allow_nonfinite", "missing_tensors", "copy_files_from", "name"):
            data.pop(key, None)
        params = data.get("parameters")
        if isinstance(params, dict):
            params.pop("scope", None)
            if "lambda" in params:
                params["lambda"] = params.pop("lambda")
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# -- loading ---------------------------------------------------------------------
def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file; relative model paths are taken from the recipe's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(None, f"cannot read recipe: {exc.strerror or exc}", path) from None
    except UnicodeDecodeError:
        raise RecipeError(None, "not a text file (expected YAML)", path) from None
    return parse_recipe(text, base_dir=path.parent, source=path)


def parse_recipe(text: str, *, base_dir: str | Path = ".", source: str | Path | None = None) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(None, f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", source) from None
    if not isinstance(data, dict):
        raise RecipeError(None, "a recipe is a YAML mapping with at least `merge_method` and `models`", source)
    return recipe_from_dict(data, base_dir=base_dir, source=source)


def recipe_from_dict(data: dict[str, Any], *, base_dir: str | Path = ".", source: str | Path | None = None) -> Recipe:
    base_dir = Path(base_dir)
    for key in data:
        if key in _UNSUPPORTED_MERGEKIT_KEYS:
            raise RecipeError(key, f"not supported: {_UNSUPPORTED_MERGEKIT_KEYS[key]}", source)
        if key not in _TOP_LEVEL_KEYS:
            raise RecipeError(key, f"unknown key (known: {', '.join(sorted(_TOP_LEVEL_KEYS))})", source)
    if "merge_method" not in data:
        raise RecipeError("merge_method", "missing", source)
    method = data["merge_method"]
    if not isinstance(method, str):
        raise RecipeError("merge_method", f"must be a method name, not {method!r}", source)
    tok = data.get("tokenizer_source")
    if tok not in (None, "base"):
        raise RecipeError("tokenizer_source", f"only 'base' is supported (got {tok!r}); use copy_files_from with a model index", source)

    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise RecipeError("models", "must be a non-empty list of `- model: PATH` entries", source)
    models = [_model_entry(entry, i, base_dir, source) for i, entry in enumerate(models_raw)]

    base = data.get("base_model")
    base_path = _resolve_path(base, "base_model", base_dir, source) if base is not None else None

    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecipeError("parameters", "must be a mapping of parameter names to values", source)

    overrides = []
    for i, rule in enumerate(data.get("overrides") or []):
        overrides.append(_override_entry(rule, i, source))

    alignment = None
    if data.get("alignment") is not None:
        alignment = _alignment_entry(data["alignment"], base_dir, source)

    recipe = Recipe(
        merge_method=method,
        models=models,
        base_model=base_path,
        parameters=dict(params),
        dtype=str(data.get("dtype", "float32")),
        out_dtype=None if data.get("out_dtype") is None else str(data["out_dtype"]),
        seed=data.get("seed", 0),
        device=str(data.get("device", "auto")),
        backend=str(data.get("backend", "auto")),
        overrides=overrides,
        alignment=alignment,
        allow_nonfinite=_bool(data.get("allow_nonfinite", False), "allow_nonfinite", source),
        missing_tensors=str(data.get("missing_tensors", "error")),
        copy_files_from=str(data.get("copy_files_from", "base")),
        name=None if data.get("name") is None else str(data["name"]),
        source=None if source is None else Path(source),
    )
    return recipe.validate()


def _model_entry(entry: Any, i: int, base_dir: Path, source: Any) -> ModelInput:
    key = f"models[{i}]"
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise RecipeError(key, "each entry needs `model: PATH`", source)
    for k in entry:
        if k == "layer_range":
            raise RecipeError(f"{key}.layer_range", "not supported: layer slicing (frankenmerges)", source)
        if k not in ("model", "parameters"):
            raise RecipeError(f"{key}.{k}", "unknown key (known: model, parameters)", source)
    model = entry["model"]
    if isinstance(model, dict):  # mergekit's long form: {model: {path: X}, lora: {path: Y}}
        inner = model.get("model", model)
        path = inner.get("path") if isinstance(inner, dict) else inner
        lora = model.get("lora")
        lora = lora.get("path") if isinstance(lora, dict) else lora
        model = f"{path}+{lora}" if lora else path
    if not isinstance(model, str) or not model.strip():
        raise RecipeError(f"{key}.model", f"must be a path, not {model!r}", source)
    lora_path = None
    if "+" in model and not Path(model).exists():
        main, _, adapter = model.partition("+")
        model, lora_path = main, _resolve_path(adapter, f"{key}.model", base_dir, source)
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"{key}.parameters", "must be a mapping", source)
    return ModelInput(_resolve_path(model, f"{key}.model", base_dir, source), dict(params), lora_path)


def _override_entry(rule: Any, i: int, source: Any) -> Override:
    key = f"overrides[{i}]"
    if not isinstance(rule, dict):
        raise RecipeError(key, "must be a mapping with `match` and/or `layers`, and `parameters`", source)
    for k in rule:
        if k not in ("match", "layers", "parameters"):
            raise RecipeError(f"{key}.{k}", "unknown key (known: match, layers, parameters)", source)
    if "match" not in rule and "layers" not in rule:
        raise RecipeError(key, "needs `match` (a regex) or `layers` ([first, last])", source)
    layers = rule.get("layers")
    if layers is not None:
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers, layers]
        if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in layers)):
            raise RecipeError(f"{key}.layers", "must be [first, last] layer indices (inclusive) or one index", source)
        if layers[0] > layers[1]:
            raise RecipeError(f"{key}.layers", f"first ({layers[0]}) is after last ({layers[1]})", source)
        layers = (layers[0], layers[1])
    match = rule.get("match")
    if match is not None and not isinstance(match, str):
        raise RecipeError(f"{key}.match", "must be a regular expression string", source)
    params = rule.get("parameters")
    if not isinstance(params, dict) or not params:
        raise RecipeError(f"{key}.parameters", "must be a non-empty mapping", source)
    return Override(dict(params), match, layers)


def _alignment_entry(raw: Any, base_dir: Path, source: Any) -> Alignment:
    if isinstance(raw, str):
        raw = {"spec": raw}
    if not isinstance(raw, dict) or "spec" not in raw:
        raise RecipeError("alignment", "must be a mapping with `spec` (mlp, resnet, vit, gpt2 or a spec file)", source)
    for k in raw:
        if k not in ("spec", "reference", "seed", "max_rounds"):
            raise RecipeError(f"alignment.{k}", "unknown key (known: spec, reference, seed, max_rounds)", source)
    spec = str(raw["spec"])
    if spec not in ("mlp", "resnet", "vit", "gpt2"):
        spec = str(_resolve_path(spec, "alignment.spec", base_dir, source))
    ref = raw.get("reference")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise RecipeError("alignment.seed", f"must be a non-negative whole number, not {seed!r}", source)
    rounds = raw.get("max_rounds", 100)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise RecipeError("alignment.max_rounds", f"must be a positive whole number, not {rounds!r}", source)
    return Alignment(spec, None if ref is None else _resolve_path(ref, "alignment.reference", base_dir, source), seed, rounds)


def _resolve_path(value: Any, key: str, base_dir: Path, source: Any) -> Path:
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise RecipeError(key, f"must be a path, not {value!r}", source)
    p = Path(str(value)).expanduser()
    if not p.is_absolute():
        p = (base_dir / p).resolve()
    return p


def _bool(value: Any, key: str, source: Any) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(key, f"must be true or false, not {value!r}", source)
    return value


def _canonical(method: MergeMethod, key: str) -> str:
    return method.param(key).name


def _check_params(method: MergeMethod, params: dict[str, Any], where: str, *, per_model: bool, source: Any) -> None:
    for key, raw in params.items():
        try:
            p = method.param(str(key))
        except KeyError:
            known = ", ".join(p.name for p in method.params) or "none"
            raise RecipeError(f"{where}.{key}", f"unknown parameter for method '{method.name}' (known: {known})", source) from None
        if per_model and not p.per_model:
            raise RecipeError(f"{where}.{key}", f"cannot be set per model for method '{method.name}'; set it under the top-level `parameters`", source)
        for value in _leaf_values(raw, f"{where}.{key}", source):
            try:
                p.coerce(value)
            except ValueError as exc:
                raise RecipeError(f"{where}.{key}", str(exc), source) from None


def _leaf_values(raw: Any, key: str, source: Any) -> list[Any]:
    """The scalar values inside a scalar, a gradient list or a conditional list."""
    if not isinstance(raw, list):
        return [raw]
    if not raw:
        raise RecipeError(key, "an empty list has no value", source)
    if all(isinstance(v, dict) for v in raw):
        values = []
        for entry in raw:
            extra = set(entry) - {"filter", "value"}
            if extra or "value" not in entry:
                raise RecipeError(key, "conditional entries are `{filter: TEXT, value: V}` (filter optional)", source)
            values.extend(_leaf_values(entry["value"], key, source))
        return values
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        return list(raw)
    raise RecipeError(key, "a list must be all numbers (a gradient across layers) or all {filter, value} entries", source)


def _value_at(raw: Any, tensor: str, position: float) -> Any:
    """Evaluate a scalar / gradient / conditional parameter for one tensor."""
    if not isinstance(raw, list):
        return raw
    if all(isinstance(v, dict) for v in raw):
        fallback = None
        for entry in raw:
            filt = entry.get("filter")
            if filt is None:
                if fallback is None:
                    fallback = entry
            elif filt in tensor:
                return _value_at(entry["value"], tensor, position)
        if fallback is None:
            raise RecipeError(None, f"no conditional entry matches tensor '{tensor}' and there is no fallback without `filter`")
        return _value_at(fallback["value"], tensor, position)
    if len(raw) == 1:
        return raw[0]
    scaled = position * (len(raw) - 1)
    lo = min(int(scaled), len(raw) - 2)
    frac = scaled - lo
    return raw[lo] * (1.0 - frac) + raw[lo + 1] * frac


def _scalar_or_none(value: Any) -> Any:
    return value if not isinstance(value, list) else None
