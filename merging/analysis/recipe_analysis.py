"""The analysis of a recipe's inputs, with the recipe's own trim density, scope and PCB settings.

Opening goes through the executor (`open_inputs`), so LoRA adapters and
permutation alignment are handled exactly as the merge will handle them.
Retention compares against the executor's dry run (`iter_merged_tensors`):
the merge is computed tensor by tensor and nothing is written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import open_checkpoint
from ..errors import AlloyError
from ..layers import LayerMap
from ..progress import CancelToken, ProgressCallback
from ..recipe import Recipe
from .interference import DEFAULT_DENSITIES, SCOPES, analyze, shared_tensors
from .permutation import alignment_similarity
from .result import RecipeAnalysis

# Which recipe parameter is the TIES-style trim density, per method.
_DENSITY_PARAM = {"ties": "density", "dare_ties": "trim_density", "breadcrumbs": "density"}


def _scalar(value: Any) -> Any:
    """A per-model list of equal values -> the value; unequal -> their mean (for a marker only)."""
    if isinstance(value, list):
        values = [float(v) for v in value]
        return values[0] if len(set(values)) == 1 else sum(values) / len(values)
    return value


def recipe_settings(recipe: Recipe, names: Sequence[str] | None = None) -> dict[str, Any]:
    """density (or None), scope, pcb_ratio, pcb_clip and trim_rule the recipe implies for the analysis."""
    method = recipe.method
    known = {p.name for p in method.params}
    params: dict[str, Any] = {}
    if names:
        params = recipe.resolve(names[0], LayerMap(names))
    else:
        params = {p.name: p.default for p in method.params}
        params.update(recipe.parameters)
    out: dict[str, Any] = {"density": None, "scope": "global", "pcb_ratio": 0.1, "pcb_clip": 1e-4, "trim_rule": "official"}
    key = _DENSITY_PARAM.get(recipe.merge_method)
    if key is not None and key in known:
        out["density"] = float(_scalar(params.get(key)))
    if "scope" in known and params.get("scope") in SCOPES:
        out["scope"] = params["scope"]
    elif "scope" in known:
        out["scope"] = "tensor"  # row-wise scopes are closest to per-tensor
    if "trim_rule" in known:
        out["trim_rule"] = str(params.get("trim_rule", "official"))
    if recipe.merge_method == "pcb":
        out["pcb_ratio"] = float(_scalar(params.get("pcb_ratio", 0.1)))
        out["pcb_clip"] = float(_scalar(params.get("clip_ratio", 1e-4)))
    return out


def analyze_recipe(
    recipe: Recipe,
    *,
    retention: bool = False,
    alignment: bool = True,
    densities: Sequence[float] | None = None,
    exact: bool | None = None,
    sample_size: int | None = None,
    block_size: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    cache_dir: str | Path | None = None,
) -> RecipeAnalysis:
    """Interference of the recipe's fine-tunes against its base, and alignment similarity when it aligns.

    The density grid is `DEFAULT_DENSITIES` plus the recipe's own density.
    `retention` adds cos(τ_merged, τ_i) from a dry-run merge (the cost of a
    merge without the writing). A recipe without a base model gets alignment
    results only (when it aligns); otherwise there is nothing to analyse.
    """
    from ..executor import iter_merged_tensors, open_inputs, plan_merge

    inputs = open_inputs(recipe, progress=progress, cancel=cancel)
    try:
        interference = None
        density = None
        if inputs.base is not None:
            names, _ = shared_tensors(inputs.base, inputs.models)
            settings = recipe_settings(recipe, names)
            density = settings["density"]
            grid = list(densities) if densities is not None else list(DEFAULT_DENSITIES)
            if density is not None and 0 < density <= 1:
                grid.append(density)
            merged = None
            merged_key = None
            if retention:
                plan = plan_merge(recipe, inputs)

                def merged(progress: ProgressCallback | None = None, cancel: CancelToken | None = None):  # type: ignore[no-redef]
                    return iter_merged_tensors(plan, progress=progress, cancel=cancel)

                merged_key = "dry-run merge of recipe " + hashlib.sha256(recipe.to_yaml().encode("utf-8")).hexdigest()[:16]
            interference = analyze(
                inputs.base, inputs.models, densities=grid, exact=exact, sample_size=sample_size, seed=recipe.seed,
                scope=settings["scope"], trim_rule=settings["trim_rule"], pcb_ratio=settings["pcb_ratio"],
                pcb_clip=settings["pcb_clip"], merged=merged, merged_key=merged_key,
                labels=[m.label for m in recipe.models], progress=progress, cancel=cancel, cache_dir=cache_dir,
                block_size=block_size,
            )
        alignments = []
        if alignment and recipe.alignment is not None and inputs.alignment:
            al = recipe.alignment
            reference = open_checkpoint(al.reference) if al.reference is not None else inputs.models[0]
            ref_label = al.reference.name if al.reference is not None else recipe.models[0].label
            matches = iter(inputs.alignment)
            for i, (model_input, aligned) in enumerate(zip(recipe.models, inputs.models)):
                if al.reference is None and i == 0:
                    continue
                original = open_checkpoint(model_input.lora, base=open_checkpoint(model_input.path)) if model_input.lora else open_checkpoint(model_input.path)
                alignments.append(alignment_similarity(
                    reference, original, aligned, exact=exact, sample_size=sample_size, seed=recipe.seed,
                    block_size=block_size,
                    match=next(matches, None), labels=(ref_label, model_input.label), progress=progress, cancel=cancel,
                ))
        if interference is None and not alignments:
            raise AlloyError(
                f"{recipe.source or 'recipe'}: nothing to analyse: interference needs a base model (`base_model`) "
                "and alignment similarity needs an `alignment` section"
            )
        return RecipeAnalysis(
            recipe=str(recipe.source) if recipe.source is not None else "",
            merge_method=recipe.merge_method,
            density=density,
            interference=interference,
            alignments=alignments,
        )
    finally:
        inputs.close()
