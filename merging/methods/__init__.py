"""Merge methods, one module each; importing this package registers them all."""

from .base import MergeMethod, Param, TensorJob
from .registry import get_method, method_names, register
from . import linear, task_arithmetic  # noqa: F401  (registration)
from . import ties, dare, breadcrumbs, pcb  # noqa: F401  (registration)

__all__ = ["MergeMethod", "Param", "TensorJob", "get_method", "method_names", "register"]
