"""Layer indices parsed from tensor names, for per-layer overrides and plots.

`model.layers.12.mlp.up_proj.weight` -> 12, `h.3.attn.c_attn.weight` -> 3,
`down_blocks.1.resnets.0.conv1.weight` -> 1: the first dotted component that
is a number. Names without one (embeddings, final norms, heads) have none.
"""

from __future__ import annotations

import re
from typing import Iterable

_FIRST_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")
_INPUT_SIDE = re.compile(r"embed|wte|wpe|patch|cls_token|position|conv_in|time_embed", re.IGNORECASE)


def layer_index(name: str) -> int | None:
    match = _FIRST_INDEX.search(name)
    return int(match.group(1)) if match else None


class LayerMap:
    """Positions of tensors along the depth of a model, in [0, 1].

    Gradient parameters (a list of values across layers, as in mergekit) are
    interpolated at this position. Numbered layers are spread evenly by rank;
    un-numbered tensors sit at 0 when they look like input-side weights
    (embeddings) and at 1 otherwise (final norm, head).
    """

    def __init__(self, names: Iterable[str]):
        indices = sorted({i for i in (layer_index(n) for n in names) if i is not None})
        self.indices = indices
        self._rank = {index: rank for rank, index in enumerate(indices)}

    @property
    def count(self) -> int:
        return len(self.indices)

    def position(self, name: str) -> float:
        index = layer_index(name)
        if index is None:
            return 0.0 if _INPUT_SIDE.search(name) else 1.0
        if len(self.indices) <= 1:
            return 0.0
        return self._rank[index] / (len(self.indices) - 1)

    def label(self, name: str) -> str:
        index = layer_index(name)
        return f"layer {index}" if index is not None else name.rsplit(".", 1)[0] or name
