"""Checks on tensor values that headers cannot vouch for."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError


def check_finite(tensor: torch.Tensor, path: str | Path | None, name: str) -> None:
    """Raise CheckpointError if a floating tensor holds NaN or Inf; a merge would spread them everywhere."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    if tensor.is_floating_point():
        # One reduction pass, no mask: a NaN or Inf anywhere makes the sum non-finite,
        # so a finite sum proves the tensor clean; only a non-finite one (maybe a
        # mere overflow of large values) needs the element-wise look.
        total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
        if bool(torch.isfinite(total)):
            return
    if bool(torch.isfinite(tensor).all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    raise CheckpointError(
        path, f"contains NaN/Inf ({nan} NaN, {inf} Inf of {tensor.numel()} values)", tensor=name
    )
