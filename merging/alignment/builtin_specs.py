"""Built-in permutation specs, inferred from tensor names and shapes (ALGORITHMS_DETAIL.md §8.4).

- `mlp`: a chain of Linear layers (consecutive 2-D weights whose shapes chain,
  in natural name order) with their biases.
- `resnet`: torchvision naming (conv1/bn1, layerN.M.convK/bnK, downsample, fc);
  a residual stage shares one group until a projection shortcut starts the next.
- `vit`: Hugging Face ViT naming; `gpt2`: Hugging Face GPT-2 naming (Conv1D
  weights stored (in, out), fused `c_attn`). One residual-stream group, one group
  per MLP hidden layer, attention heads permuted as whole units.

A tensor a builder cannot place is an error naming it: leaving it unpermuted
could silently change what the aligned model computes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import CheckpointError, RecipeError
from .spec import AttentionGroup, AxisEntry, PermutationSpec, Shapes, read_spec_file

BUILTIN_SPECS = ("mlp", "resnet", "vit", "gpt2")
ATTENTION_MODES = ("heads", "within", "off")

_BN_STATS = ("running_mean", "running_var")


def natural_key(name: str) -> list[Any]:
    """Sort key that orders `layers.10` after `layers.2`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _unplaced(spec_name: str, tensor: str, path: str | Path | None, hint: str) -> CheckpointError:
    return CheckpointError(path, f"the {spec_name} spec does not know where this tensor fits ({hint}); write a spec file for this model", tensor=tensor)


# -- MLP ------------------------------------------------------------------------


def mlp_spec(shapes: Shapes, *, path: str | Path | None = None) -> PermutationSpec:
    """Hidden layer ℓ gets group `P_<layer>`: rows of its weight and bias, columns of the next weight."""
    weights = sorted((n for n, s in shapes.items() if len(s) == 2 and n.endswith("weight")), key=natural_key)
    if len(weights) < 2:
        raise CheckpointError(path, f"the mlp spec needs at least two 2-D weights (a hidden layer); found {len(weights)}")
    axes: dict[str, tuple[AxisEntry, ...]] = {}
    previous: str | None = None
    for index, name in enumerate(weights):
        out_size, in_size = shapes[name]
        if index > 0 and in_size != shapes[weights[index - 1]][0]:
            raise CheckpointError(
                path,
                f"the mlp spec chains 2-D weights in name order, but this one's input size {in_size} "
                f"differs from the output size {shapes[weights[index - 1]][0]} of '{weights[index - 1]}'",
                tensor=name,
            )
        last = index == len(weights) - 1
        module = name[: -len("weight")].rstrip(".")
        group = None if last else f"P_{module or index}"
        axes[name] = (group, previous)
        bias = name[: -len("weight")] + "bias"
        if bias in shapes:
            if tuple(shapes[bias]) != (out_size,):
                raise CheckpointError(path, f"bias of shape {tuple(shapes[bias])} does not match its weight's {out_size} outputs", tensor=bias)
            axes[bias] = (group,)
        previous = group
    for name in shapes:
        if name not in axes:
            raise _unplaced("mlp", name, path, "not a 2-D weight or the bias of one")
    return PermutationSpec(axes, name="mlp")


# -- ResNet -----------------------------------------------------------------------

_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")
_BLOCK_PART = re.compile(r"^(?:(conv|bn)(\d+)|downsample\.(\d+))\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def resnet_spec(shapes: Shapes, *, path: str | Path | None = None) -> PermutationSpec:
    """torchvision ResNet (basic or bottleneck blocks, any number of stages).

    The stem output group is the first residual stream; a block without a
    projection shortcut adds into the stream it reads, so its last conv writes
    that group; a block with `downsample` starts a new stage group. Inner convs
    get their own groups. BatchNorm parameters and running statistics follow
    their conv; the statistics are permuted but left out of the matching cost.
    """
    stems = [n for n in shapes if n.endswith("conv1.weight") and "layer" not in n and len(shapes[n]) == 4]
    if len(stems) != 1:
        raise CheckpointError(path, "the resnet spec expects torchvision naming: one stem 'conv1.weight' (4-D), then bn1, layerN.M.convK/bnK, downsample, fc")
    prefix = stems[0][: -len("conv1.weight")]
    axes: dict[str, tuple[AxisEntry, ...]] = {}
    exclude: set[str] = set()

    def add_conv(name: str, out: str | None, inp: str | None) -> None:
        axes[name] = (out, inp) + (None,) * (len(shapes[name]) - 2)

    def add_norm(module: str, group: str) -> None:
        for leaf in ("weight", "bias", *_BN_STATS):
            name = f"{module}.{leaf}"
            if name in shapes:
                axes[name] = (group,)
                if leaf in _BN_STATS:
                    exclude.add(name)

    stream = "P_stem"
    add_conv(prefix + "conv1.weight", stream, None)
    if prefix + "conv1.bias" in shapes:
        axes[prefix + "conv1.bias"] = (stream,)
    add_norm(prefix + "bn1", stream)

    blocks: dict[tuple[int, int], dict[str, Any]] = {}
    for name in shapes:
        if not name.startswith(prefix):
            continue
        match = _BLOCK.match(name[len(prefix):])
        if not match:
            continue
        part = _BLOCK_PART.match(match.group(3))
        if not part:
            raise _unplaced("resnet", name, path, "expected convK, bnK or downsample.I inside a block")
        block = blocks.setdefault((int(match.group(1)), int(match.group(2))), {"convs": set(), "down": set()})
        if part.group(1) == "conv":
            block["convs"].add(int(part.group(2)))
        elif part.group(3) is not None:
            block["down"].add(int(part.group(3)))

    for (stage, index), block in sorted(blocks.items()):
        base = f"{prefix}layer{stage}.{index}."
        if not block["convs"]:
            raise _unplaced("resnet", base + "*", path, "a block without convK weights")
        if block["down"]:
            out = f"P_layer{stage}" if index == 0 else f"P_layer{stage}.{index}"
        else:
            out = stream
        convs = sorted(block["convs"])
        reading = stream
        for k in convs:
            conv = f"{base}conv{k}.weight"
            if conv not in shapes:
                raise _unplaced("resnet", f"{base}conv{k}.bias", path, "a conv bias without its weight")
            writes = out if k == convs[-1] else f"P_layer{stage}.{index}.conv{k}"
            add_conv(conv, writes, reading)
            if f"{base}conv{k}.bias" in shapes:
                axes[f"{base}conv{k}.bias"] = (writes,)
            add_norm(f"{base}bn{k}", writes)
            reading = writes
        for i in sorted(block["down"]):
            module = f"{base}downsample.{i}"
            weight = f"{module}.weight"
            if weight in shapes and len(shapes[weight]) == 4:
                add_conv(weight, out, stream)
                if f"{module}.bias" in shapes:
                    axes[f"{module}.bias"] = (out,)
            else:
                add_norm(module, out)
        stream = out

    fc = prefix + "fc.weight"
    if fc in shapes:
        axes[fc] = (None, stream)
        if prefix + "fc.bias" in shapes:
            axes[prefix + "fc.bias"] = (None,)
    for name in shapes:
        if name not in axes and not name.endswith("num_batches_tracked"):
            raise _unplaced("resnet", name, path, "not a stem, block, downsample or fc tensor")
    return PermutationSpec(axes, cost_exclude=frozenset(exclude), name="resnet")


# -- transformers ----------------------------------------------------------------------


def _attention_entries(mode: str, layer: int) -> tuple[str | None, str | None]:
    if mode == "off":
        return None, None
    return f"P_qk.{layer}", f"P_vo.{layer}"


def _check_mode(attention: str, num_heads: int | None, spec_name: str) -> None:
    if attention not in ATTENTION_MODES:
        raise RecipeError("attention", f"must be one of {', '.join(ATTENTION_MODES)}, not {attention!r}")
    if attention != "off" and not num_heads:
        raise RecipeError(
            "num_heads",
            f"the {spec_name} spec needs the number of attention heads to permute attention: "
            "keep config.json beside the checkpoint, give num_heads (--num-heads), or use attention 'off'",
        )


def _attention_groups(layers: set[int], mode: str, num_heads: int | None) -> tuple[AttentionGroup, ...]:
    if mode == "off":
        return ()
    return tuple(
        AttentionGroup(f"P_qk.{i}", f"P_vo.{i}", int(num_heads or 1), permute_heads=(mode == "heads"))
        for i in sorted(layers)
    )


_VIT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def vit_spec(shapes: Shapes, *, num_heads: int | None = None, attention: str = "heads",
             path: str | Path | None = None) -> PermutationSpec:
    """Hugging Face ViT (`ViTModel`, `ViTForImageClassification`), pre-LN blocks."""
    stems = [n for n in shapes if n.endswith("embeddings.patch_embeddings.projection.weight")]
    if len(stems) != 1:
        raise CheckpointError(path, "the vit spec expects Hugging Face ViT naming ('embeddings.patch_embeddings.projection.weight', 'encoder.layer.N.…')")
    prefix = stems[0][: -len("embeddings.patch_embeddings.projection.weight")]
    _check_mode(attention, num_heads, "vit")
    res = "P_res"
    pooled = prefix + "pooler.dense.weight" in shapes
    axes: dict[str, tuple[AxisEntry, ...]] = {}
    layers: set[int] = set()
    for name, shape in shapes.items():
        local = name[len(prefix):] if name.startswith(prefix) else None
        entry: tuple[AxisEntry, ...] | None = None
        if local in ("embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings"):
            entry = (None,) * (len(shape) - 1) + (res,)
        elif local == "embeddings.patch_embeddings.projection.weight":
            entry = (res,) + (None,) * (len(shape) - 1)
        elif local in ("embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias"):
            entry = (res,)
        elif local == "pooler.dense.weight":
            entry = (None, res)
        elif name == "classifier.weight":
            # The classifier reads the [CLS] residual stream, or the pooler's (unpermuted) output when there is one.
            entry = (None, None if pooled else res)
        elif local in ("pooler.dense.bias",) or name == "classifier.bias":
            entry = (None,)
        elif local is not None and (m := _VIT_LAYER.match(local)):
            layer, part = int(m.group(1)), m.group(2)
            qk, vo = _attention_entries(attention, layer)
            mlp = f"P_mlp.{layer}"
            table: dict[str, tuple[AxisEntry, ...]] = {
                "attention.attention.query.weight": (qk, res),
                "attention.attention.query.bias": (qk,),
                "attention.attention.key.weight": (qk, res),
                "attention.attention.key.bias": (qk,),
                "attention.attention.value.weight": (vo, res),
                "attention.attention.value.bias": (vo,),
                "attention.output.dense.weight": (res, vo),
                "attention.output.dense.bias": (res,),
                "intermediate.dense.weight": (mlp, res),
                "intermediate.dense.bias": (mlp,),
                "output.dense.weight": (res, mlp),
                "output.dense.bias": (res,),
                "layernorm_before.weight": (res,),
                "layernorm_before.bias": (res,),
                "layernorm_after.weight": (res,),
                "layernorm_after.bias": (res,),
            }
            entry = table.get(part)
            if entry is not None:
                layers.add(layer)
        if entry is None:
            raise _unplaced("vit", name, path, "not an embedding, encoder-layer, layernorm, pooler or classifier tensor")
        axes[name] = entry
    return PermutationSpec(axes, _attention_groups(layers, attention, num_heads), name="vit")


_GPT2_LAYER = re.compile(r"^h\.(\d+)\.(.+)$")
_GPT2_BUFFERS = ("attn.bias", "attn.masked_bias")


def gpt2_spec(shapes: Shapes, *, num_heads: int | None = None, attention: str = "heads",
              path: str | Path | None = None) -> PermutationSpec:
    """Hugging Face GPT-2 (`GPT2Model`, `GPT2LMHeadModel`, `GPT2ForSequenceClassification`).

    GPT-2's Conv1D stores weights as (in, out), so the permuted axis of each
    projection is the transpose of a Linear's; `c_attn` holds Q, K and V side by
    side on its output axis, a fused axis with three segments.
    """
    stems = [n for n in shapes if n == "wte.weight" or n.endswith(".wte.weight")]
    if len(stems) != 1:
        raise CheckpointError(path, "the gpt2 spec expects Hugging Face GPT-2 naming ('wte.weight', 'wpe.weight', 'h.N.attn.c_attn.weight', …)")
    prefix = stems[0][: -len("wte.weight")]
    _check_mode(attention, num_heads, "gpt2")
    res = "P_res"
    axes: dict[str, tuple[AxisEntry, ...]] = {}
    layers: set[int] = set()
    for name, shape in shapes.items():
        local = name[len(prefix):] if name.startswith(prefix) else None
        entry: tuple[AxisEntry, ...] | None = None
        if local in ("wte.weight", "wpe.weight") or name in ("lm_head.weight", "score.weight"):
            entry = (None, res)
        elif local in ("ln_f.weight", "ln_f.bias"):
            entry = (res,)
        elif name in ("lm_head.bias", "score.bias"):
            entry = (None,)
        elif local is not None and (m := _GPT2_LAYER.match(local)):
            layer, part = int(m.group(1)), m.group(2)
            if part in _GPT2_BUFFERS:
                continue  # the causal-mask buffers of older checkpoints: copied as they are
            qk, vo = _attention_entries(attention, layer)
            qkv: AxisEntry = None if qk is None else (qk, qk, vo)
            mlp = f"P_mlp.{layer}"
            table: dict[str, tuple[AxisEntry, ...]] = {
                "ln_1.weight": (res,),
                "ln_1.bias": (res,),
                "ln_2.weight": (res,),
                "ln_2.bias": (res,),
                "attn.c_attn.weight": (res, qkv),
                "attn.c_attn.bias": (qkv,),
                "attn.c_proj.weight": (vo, res),
                "attn.c_proj.bias": (res,),
                "mlp.c_fc.weight": (res, mlp),
                "mlp.c_fc.bias": (mlp,),
                "mlp.c_proj.weight": (mlp, res),
                "mlp.c_proj.bias": (res,),
            }
            entry = table.get(part)
            if entry is not None:
                layers.add(layer)
        if entry is None:
            raise _unplaced("gpt2", name, path, "not an embedding, block, ln_f or head tensor")
        axes[name] = entry
    return PermutationSpec(axes, _attention_groups(layers, attention, num_heads), name="gpt2")


# -- choosing a spec ------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., PermutationSpec]] = {
    "mlp": mlp_spec,
    "resnet": resnet_spec,
    "vit": vit_spec,
    "gpt2": gpt2_spec,
}
_HEAD_KEYS = {"vit": ("num_attention_heads",), "gpt2": ("n_head", "num_attention_heads")}


def heads_from_config(config: Mapping[str, Any] | None, spec_name: str) -> int | None:
    """Number of attention heads from a Hugging Face config.json, if it says."""
    if not config:
        return None
    for key in _HEAD_KEYS.get(spec_name, ()):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def load_spec(source: "str | Path | PermutationSpec", shapes: Shapes, *, config: Mapping[str, Any] | None = None,
              num_heads: int | None = None, attention: str = "heads", path: str | Path | None = None) -> PermutationSpec:
    """A spec checked against `shapes`: a built-in name (mlp, resnet, vit, gpt2), a YAML/JSON file, or a spec.

    `shapes` is `{name: shape}` (from headers; no weights are read). For vit and
    gpt2 the head count comes from `num_heads` or `config` (config.json);
    `attention` is `heads` (whole heads and dims within them), `within` (dims
    within each head only) or `off` (Q/K/V/O outputs left in place). `path`
    names the checkpoint in error messages.
    """
    if isinstance(source, PermutationSpec):
        spec = source
    elif str(source) in _BUILDERS:
        name = str(source)
        if name in ("vit", "gpt2"):
            heads = num_heads or heads_from_config(config, name)
            spec = _BUILDERS[name](shapes, num_heads=heads, attention=attention, path=path)
        else:
            spec = _BUILDERS[name](shapes, path=path)
    else:
        file = Path(source)
        if not file.is_file():
            raise RecipeError("spec", f"'{source}' is neither a built-in spec ({', '.join(BUILTIN_SPECS)}) nor a spec file")
        spec = read_spec_file(file)
    spec.validate(shapes, path)
    return spec
