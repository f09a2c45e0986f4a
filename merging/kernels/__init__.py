"""The hot per-tensor ops behind one interface, in two backends.

- `numba`: CPU kernels (`@njit(parallel=True, cache=True)`), the default on CPU.
- `torch`: the same ops in torch on any device, the default on CUDA.

`get_backend("auto", "auto")` picks torch on CUDA when a GPU is present, else
numba on the CPU. Both give the same results to float tolerance, and DARE's
masks are identical bit for bit.
"""

from __future__ import annotations

import functools

import torch

from ..errors import RecipeError
from .base import Backend, Flat

BACKENDS = ("auto", "numba", "torch")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is checked."""
    if isinstance(device, torch.device):
        return device
    text = str(device or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise RecipeError("device", f"unknown device '{device}' (use auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device", "device 'cuda' was asked for but no CUDA GPU is available (use auto or cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise RecipeError("device", f"device '{device}' is not supported (use auto, cpu or cuda)")
    return dev


@functools.lru_cache(maxsize=None)
def _make(name: str, device: str) -> Backend:
    if name == "numba":
        from .numba_backend import NumbaBackend

        return NumbaBackend()
    from .torch_backend import TorchBackend

    return TorchBackend(device)


def get_backend(name: str = "auto", device: str = "auto") -> Backend:
    """The kernel backend for a recipe's `backend` and `device` settings.

    `name`: auto | numba | torch. `device`: auto | cpu | cuda[:i].
    auto picks torch on CUDA, numba on CPU. numba runs on the CPU only.
    """
    key = str(name or "auto").strip().lower()
    if key not in BACKENDS:
        raise RecipeError("backend", f"unknown backend '{name}' (use {', '.join(BACKENDS)})")
    dev = resolve_device(device)
    if key == "auto":
        key = "torch" if dev.type == "cuda" else "numba"
    if key == "numba" and dev.type != "cpu":
        raise RecipeError("backend", f"the numba backend runs on the CPU only, not on '{dev}' (use backend torch)")
    return _make(key, str(dev))


__all__ = ["Backend", "Flat", "get_backend", "resolve_device", "BACKENDS"]
