"""Checks on tensor values that headers cannot vouch for."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError


def check_finite(tensor: torch.Tensor, path: str | Path | None, name: str) -> None:
    """Raise CheckpointError if a floating tensor holds NaN or Inf; a merge would spread them everywhere."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    if bool(torch.isfinite(tensor).all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    raise CheckpointError(
        path, f"contains NaN/Inf ({nan} NaN, {inf} Inf of {tensor.numel()} values)", tensor=name
    )
