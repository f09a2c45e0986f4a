"""Interference diagnostics: do the fine-tunes fight each other? (the numbers behind the preview plots)

    result = analyze(base, [ft_a, ft_b, ft_c], progress=cb, cancel=token, cache_dir=default_cache_dir())
    result.cosine()                    # (n, n) cosine similarity of task vectors, overall
    result.sign_conflict("layer")      # (layers, densities) sign-conflict rate after trimming
    result.sign_conflict_at(0.2)       # any density, from the stored grid
    result.threshold_for(0, 0.2)       # the trim threshold of model 0 at density 0.2
    result.to_json()

`analyze_recipe(recipe)` does the same for a recipe's inputs, with the recipe's
density, scope and PCB ratio and, optionally, retention against a dry-run merge.
"""

from .cache import AnalysisCache, cache_key, checkpoint_identity, default_cache_dir
from .interference import DEFAULT_DENSITIES, SCOPES, analyze, model_label, shared_tensors
from .permutation import alignment_similarity
from .recipe_analysis import analyze_recipe, recipe_settings
from .result import AlignmentResult, AnalysisResult
from .sampling import AUTO_EXACT_MAX_PARAMS, DEFAULT_SAMPLE_SIZE, TensorSample, block_for, plan_sample, read_values, release_maps

__all__ = [
    "AUTO_EXACT_MAX_PARAMS",
    "AlignmentResult",
    "AnalysisCache",
    "AnalysisResult",
    "DEFAULT_DENSITIES",
    "DEFAULT_SAMPLE_SIZE",
    "SCOPES",
    "TensorSample",
    "alignment_similarity",
    "analyze",
    "analyze_recipe",
    "block_for",
    "cache_key",
    "checkpoint_identity",
    "default_cache_dir",
    "model_label",
    "plan_sample",
    "read_values",
    "release_maps",
    "recipe_settings",
    "shared_tensors",
]
