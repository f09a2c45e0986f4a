"""Name -> merge method. Adding a method is one file plus one line in `__init__`."""

from __future__ import annotations

from .base import MergeMethod

_METHODS: dict[str, MergeMethod] = {}


def register(method_cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available to recipes, the CLI and the GUI."""
    instance = method_cls()
    if not instance.name:
        raise ValueError(f"{method_cls.__name__} has no name")
    _METHODS[instance.name] = instance
    return method_cls


def get_method(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS))
        raise KeyError(f"unknown merge method '{name}' (known: {known})") from None


def method_names() -> list[str]:
    return list(_METHODS)
