"""check_finite: NaN/Inf become one CheckpointError naming file and tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merging.errors import CheckpointError
from merging.formats.validate import check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nan_and_inf_are_reported_with_counts(dtype: torch.dtype) -> None:
    t = torch.zeros(10, dtype=dtype)
    t[1] = float("nan")
    t[3] = float("inf")
    t[4] = float("-inf")
    with pytest.raises(CheckpointError) as info:
        check_finite(t, Path("/models/a.safetensors"), "layers.0.weight")
    err = info.value
    assert err.path == Path("/models/a.safetensors") and err.tensor == "layers.0.weight"
    assert "contains NaN/Inf (1 NaN, 2 Inf of 10 values)" in str(err)


def test_finite_and_non_float_tensors_pass() -> None:
    check_finite(torch.randn(100), "a.safetensors", "w")
    check_finite(torch.tensor([torch.finfo(torch.float16).max], dtype=torch.float16), "a", "w")
    check_finite(torch.arange(5), "a", "ids")
    check_finite(torch.tensor([True, False]), "a", "mask")
    check_finite(torch.empty(0), "a", "empty")
