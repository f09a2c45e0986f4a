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


def test_finite_values_whose_sum_overflows_still_pass() -> None:
    big = torch.finfo(torch.float32).max
    check_finite(torch.tensor([big, big, -big, big]), "a", "w")  # the sum is +Inf; every value is finite
    check_finite(torch.full((1000,), 60000.0, dtype=torch.float16), "a", "w")
    check_finite(torch.full((10,), torch.finfo(torch.float64).max, dtype=torch.float64), "a", "w")


def test_opposite_infinities_that_cancel_in_a_sum_are_caught() -> None:
    t = torch.tensor([1.0, float("inf"), float("-inf"), 2.0])  # the sum is NaN, not Inf
    with pytest.raises(CheckpointError, match=r"\(0 NaN, 2 Inf of 4 values\)"):
        check_finite(t, "a", "w")
