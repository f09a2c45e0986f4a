"""Alloy's merge engine: checkpoints, recipes, methods, streaming execution, export.

Headless by design: nothing in this package imports Qt.
"""

__version__ = "0.1.0"
