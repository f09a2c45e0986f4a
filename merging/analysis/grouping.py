"""Tensors grouped into layers for the per-layer plots.

A layer is the name up to and including its first numbered component
(`model.layers.12`, `layer1.0`, `down_blocks.1`), the component
`merging.layers.layer_index` reads. Grouping by that prefix rather than by the
number alone keeps `layer1.0` and `layer2.0` of a ResNet apart. A tensor
without a number (embeddings, final norm, head) falls back to its module, the
name without its last component, so it is its own group or shares one with its
bias. Groups are ordered along the depth of the model: input-side modules
(embeddings, a CNN's stem), numbered layers, then the rest.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..layers import LayerMap, layer_index


# Un-numbered modules that sit at the input of CNNs (torchvision ResNet's stem), besides LayerMap's embeddings.
_STEM = re.compile(r"^(conv1|bn1|stem|conv_stem|bn_stem)(\.|$)")


def _split(name: str) -> tuple[str, str | None, int | None]:
    """(group key, stem before the number, the number) of one tensor name."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isascii() and part.isdigit():
            return ".".join(parts[: i + 1]), ".".join(parts[:i]), int(part)
    module = name.rsplit(".", 1)[0] if "." in name else name
    return module, None, None


def layer_groups(names: Sequence[str]) -> tuple[list[str], list[int]]:
    """Labels of the layers in depth order, and the layer of each name (an index into the labels)."""
    depth = LayerMap(names)
    keys: dict[str, tuple[str | None, int | None]] = {}
    first_seen: dict[str, int] = {}
    first_name: dict[str, str] = {}
    stems: dict[str, int] = {}
    for order, name in enumerate(names):
        key, stem, index = _split(name)
        assert (index is None) == (layer_index(name) is None)
        if key not in keys:
            keys[key] = (stem, index)
            first_seen[key] = order
            first_name[key] = name
        if stem is not None and stem not in stems:
            stems[stem] = order

    def sort_key(key: str) -> tuple:
        stem, index = keys[key]
        if stem is not None:
            return (1, stems[stem], index, 0)
        first = first_name[key]
        side = 0 if (depth.position(first) == 0.0 or _STEM.match(first)) else 2
        return (side, first_seen[key], 0, 0)

    ordered = sorted(keys, key=sort_key)
    one_stem = len(stems) == 1
    labels = []
    for key in ordered:
        stem, index = keys[key]
        labels.append(f"layer {index}" if (stem is not None and one_stem) else key)
    position = {key: i for i, key in enumerate(ordered)}
    return labels, [position[_split(n)[0]] for n in names]
