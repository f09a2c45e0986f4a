"""Permutation alignment (Git Re-Basin weight matching) for models without a shared base.

Typical use::

    aligned, result = align_checkpoint(reference, other, "mlp", seed=0)
    # `aligned` is a Checkpoint: merge it, interpolate it, or write it in any format.
"""

from .apply import (
    AlignedCheckpoint,
    InterpolatedCheckpoint,
    align_checkpoint,
    align_models,
    apply_permutations,
    check_permutations,
    full_index,
    invert_permutation,
    permute_tensor,
    random_permutations,
)
from .barrier import DEFAULT_ALPHAS, BarrierResult, Curve, interpolate, loss_barrier, loss_curve
from .builtin_specs import (
    ATTENTION_MODES,
    BUILTIN_SPECS,
    gpt2_spec,
    heads_from_config,
    load_spec,
    mlp_spec,
    resnet_spec,
    vit_spec,
)
from .spec import AttentionGroup, AxisRef, PermutationSpec, read_spec_file, write_spec_file
from .weight_matching import MatchResult, weight_matching

__all__ = [
    "ATTENTION_MODES",
    "AlignedCheckpoint",
    "AttentionGroup",
    "AxisRef",
    "BUILTIN_SPECS",
    "BarrierResult",
    "Curve",
    "DEFAULT_ALPHAS",
    "InterpolatedCheckpoint",
    "MatchResult",
    "PermutationSpec",
    "align_checkpoint",
    "align_models",
    "apply_permutations",
    "check_permutations",
    "full_index",
    "gpt2_spec",
    "heads_from_config",
    "interpolate",
    "invert_permutation",
    "load_spec",
    "loss_barrier",
    "loss_curve",
    "mlp_spec",
    "permute_tensor",
    "random_permutations",
    "read_spec_file",
    "resnet_spec",
    "vit_spec",
    "weight_matching",
    "write_spec_file",
]
