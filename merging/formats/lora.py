"""A PEFT LoRA adapter folder seen as the full fine-tuned model it stands for.

A merge needs dense tensors, so an adapter is opened together with its base and
behaves like `merge_and_unload()` would: every base tensor, with
`W + s·ΔW` where the adapter has low-rank factors and the saved full tensor
where it has one (`modules_to_save`, trained biases). Conventions follow PEFT:

- linear: ΔW = s·(B @ A), A = `lora_A.weight` (r, in), B = `lora_B.weight`
  (out, r); transposed when `fan_in_fan_out` (GPT-2 `Conv1D` stores (in, out)).
- conv: A (r, in, *k), B (out, r, 1, ...): ΔW = s·(B·A) contracted over r,
  shape (out, in, *k) (PEFT's `conv(Aᵀ, B)ᵀ` for groups == 1).
- embedding: A = `lora_embedding_A` (r, num_embeddings), B =
  `lora_embedding_B` (dim, r): ΔW = s·(B @ A)ᵀ, shape (num_embeddings, dim).
- `lora_B.bias` (`lora_bias: true`): bias += s·b.
- s = α/r, or α/√r with `use_rslora`; r and α per module from `rank_pattern`
  / `alpha_pattern` (the first pattern `p` with `(.*\\.)?(p)$` matching the module
  path wins), else `r` / `lora_alpha`.

The sum is computed in float32 (float64 for float64 bases) and cast back to the
base dtype. Adapters whose weight is not base + ΔW (DoRA, ...) are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from .safetensors_file import SafetensorsFile
from .torch_pickle import TorchPickleFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_KEY_PREFIX = "base_model.model."

_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_LORA_BIAS_KEY = re.compile(r"^(?P<module>.+)\.lora_B\.bias$")

# Options under which the fine-tuned weight is not base + s·B@A on the original base.
_NOT_ADDITIVE = (
    ("use_dora", "DoRA adapters (use_dora: true) are not supported: DoRA rescales each column of W + ΔW by a learned "
                 "magnitude, so the result is not base + ΔW; merge it with PEFT's merge_and_unload() and open the merged model"),
    ("use_qalora", "QA-LoRA adapters (use_qalora: true) are not supported: their factors act on pooled inputs"),
    ("layer_replication", "adapters with layer_replication are not supported: they change the base model's layers"),
    ("target_parameters", "adapters with target_parameters are not supported"),
    ("trainable_token_indices", "adapters with trainable_token_indices are not supported"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens) cannot be merged into dense weights"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora) is not supported"),
)
# Initialisations that modify the base weights; an adapter saved without PEFT's conversion fits only that modified base.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: where its factors are and how they combine."""

    module: str  # module path inside the model, as PEFT names it
    kind: str  # "linear", "conv" or "embedding"
    target: str  # base tensor that receives ΔW
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool
    delta_shape: tuple[int, ...]


@dataclass(frozen=True)
class LoraBias:
    """A trained `lora_B.bias`: the base bias moves by scale·b."""

    key: str
    target: str
    scale: float


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """The parsed `adapter_config.json` of an adapter folder."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(path, f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, "is not a JSON object")
    return config


def match_pattern(patterns: dict[str, Any], module: str, config_path: Path) -> Any | None:
    """PEFT's rank/alpha pattern rule: the first key `p` with `(.*\\.)?(p)$` matching the module path."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as exc:
            raise CheckpointError(config_path, f"pattern '{key}' is not a valid regular expression ({exc})") from None
    return None


class LoraAdapter(Checkpoint):
    """A PEFT LoRA adapter + its base = a lazy checkpoint of the dense fine-tuned model."""

    format = "lora"

    def __init__(self, folder: str | Path, base: Checkpoint | str | Path | None = None):
        super().__init__(folder)
        self.config_path = self.path / ADAPTER_CONFIG
        self.adapter_config = read_adapter_config(self.path)
        self._check_supported()
        self.adapter_file = self._find_weight_file()
        self.base, self._owns_base = self._open_base(base)
        self._adapter: Checkpoint | None = None
        try:
            self._adapter = self._open_adapter_file()
            self._modules: dict[str, LoraModule] = {}
            self._biases: dict[str, LoraBias] = {}
            self._replacements: dict[str, str] = {}  # base name -> adapter key of a full tensor
            self._index_adapter()
        except BaseException:
            self.close()
            raise
        self._infos = self.base.infos()

    # -- opening ---------------------------------------------------------------
    def _check_supported(self) -> None:
        cfg = self.adapter_config
        peft_type = cfg.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise CheckpointError(self.config_path, f"is a {peft_type} adapter; only LoRA adapters can be merged")
        for key, message in _NOT_ADDITIVE:
            if cfg.get(key):
                raise CheckpointError(self.config_path, message)
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
            raise CheckpointError(
                self.config_path,
                f"was initialised with '{init}' and saved without PEFT's conversion, so its ΔW applies to a modified "
                "(residual) base, not to the original model; save it again with path_initial_model_for_weight_conversion",
            )
        for key in ("r", "lora_alpha"):
            value = cfg.get(key, 8)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(self.config_path, f"'{key}' is {value!r}, not a positive number")
        for key in ("rank_pattern", "alpha_pattern"):
            value = cfg.get(key) or {}
            if not isinstance(value, dict):
                raise CheckpointError(self.config_path, f"'{key}' is not an object of pattern -> number")

    def _find_weight_file(self) -> Path:
        for name in ADAPTER_WEIGHT_FILES:
            if (self.path / name).is_file():
                return self.path / name
        raise CheckpointError(self.path, f"has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)})")

    def _open_base(self, base: Checkpoint | str | Path | None) -> tuple[Checkpoint, bool]:
        hint = self.adapter_config.get("base_model_name_or_path")
        if base is None:
            if isinstance(hint, str) and os.path.isabs(hint) and Path(hint).exists():
                base = Path(hint)
            else:
                raise CheckpointError(
                    self.path,
                    f"a LoRA adapter needs its base model; {ADAPTER_CONFIG} names base_model_name_or_path '{hint}', "
                    "which is not a local path here: choose the base model to apply the adapter to",
                )
        if isinstance(base, LoraAdapter):
            raise CheckpointError(self.path, f"the base {base.path} is itself a LoRA adapter; the base must be a full model")
        if isinstance(base, Checkpoint):
            return base, False
        base_path = Path(base)
        if is_adapter_folder(base_path) or base_path.name == ADAPTER_CONFIG or (
            base_path.name in ADAPTER_WEIGHT_FILES and is_adapter_folder(base_path.parent)
        ):
            raise CheckpointError(self.path, f"the base {base_path} is itself a LoRA adapter; the base must be a full model")
        if not base_path.exists():
            raise CheckpointError(
                self.path, f"base model {base_path} does not exist ({ADAPTER_CONFIG} names base_model_name_or_path '{hint}')"
            )
        from ..checkpoint import open_checkpoint

        return open_checkpoint(base_path), True

    def _open_adapter_file(self) -> Checkpoint:
        if self.adapter_file.suffix == ".safetensors":
            return SafetensorsFile(self.adapter_file)
        return TorchPickleFile(self.adapter_file)

    def _fail(self, message: str, tensor: str | None = None) -> CheckpointError:
        return CheckpointError(self.adapter_file, f"{message} (base: {self.base.path})", tensor=tensor)

    def _index_adapter(self) -> None:
        assert self._adapter is not None
        factors: dict[str, dict[str, str]] = {}
        for key in self._adapter.names():
            short = key.removeprefix(PEFT_KEY_PREFIX)
            if "lora_magnitude_vector" in key:
                raise CheckpointError(self.adapter_file, _NOT_ADDITIVE[0][1], tensor=key)
            found = _FACTOR_KEY.match(short) or _EMBEDDING_KEY.match(short)
            if found:
                factors.setdefault(found["module"], {})[found["part"]] = key
                continue
            found = _LORA_BIAS_KEY.match(short)
            if found:
                factors.setdefault(found["module"], {})["bias"] = key
                continue
            if re.search(r"(^|\.)lora_", short):
                raise CheckpointError(self.adapter_file, "is a LoRA tensor this reader does not understand", tensor=key)
            # a full tensor (modules_to_save, a trained bias): it replaces the base tensor
            target = self._resolve(short.replace(".base_layer.", "."), key)
            if target in self._replacements:
                raise self._fail(f"'{self._replacements[target]}' and '{key}' both replace base tensor '{target}'", tensor=key)
            self._replacements[target] = key
            self._check_full_tensor(key, target)
        for module, parts in factors.items():
            self._add_module(module, parts)

    def _resolve(self, target: str, key: str) -> str:
        """The base tensor name for an adapter path: exact, else a unique suffix match either way."""
        if target in self.base:
            return target
        candidates = [n for n in self.base.names() if n.endswith("." + target) or target.endswith("." + n)]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise CheckpointError(
                self.adapter_file,
                f"adapter tensor targets '{target}', which the base model {self.base.path} does not have",
                tensor=key,
            )
        shown = ", ".join(f"'{c}'" for c in candidates[:4]) + (" ..." if len(candidates) > 4 else "")
        raise CheckpointError(
            self.adapter_file,
            f"adapter tensor targets '{target}', which matches several tensors of the base model {self.base.path}: {shown}",
            tensor=key,
        )

    def _check_full_tensor(self, key: str, target: str) -> None:
        assert self._adapter is not None
        have, want = self._adapter.info(key), self.base.info(target)
        if have.shape != want.shape:
            raise self._fail(f"full tensor has shape {have.shape} but base tensor '{target}' has {want.shape}", tensor=key)

    def _add_module(self, module: str, parts: dict[str, str]) -> None:
        assert self._adapter is not None
        cfg = self.adapter_config
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        any_key = next(iter(parts.values()))
        if a_part not in parts or b_part not in parts:
            missing = a_part if a_part not in parts else b_part
            raise CheckpointError(self.adapter_file, f"module '{module}' has no {missing} factor", tensor=any_key)
        a_key, b_key = parts[a_part], parts[b_part]
        a_shape, b_shape = self._adapter.info(a_key).shape, self._adapter.info(b_key).shape

        if embedding:
            kind = "embedding"
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise self._fail(f"embedding factors must be 2-D, got A {a_shape} and B {b_shape}", tensor=a_key)
            delta_shape = (a_shape[1], b_shape[0])
        elif len(a_shape) == 2 and len(b_shape) == 2:
            kind = "linear"
            delta_shape = (b_shape[0], a_shape[1])
            if cfg.get("fan_in_fan_out"):
                delta_shape = (a_shape[1], b_shape[0])
        elif len(a_shape) >= 3 and len(b_shape) == len(a_shape) and all(k == 1 for k in b_shape[2:]):
            kind = "conv"
            delta_shape = (b_shape[0],) + tuple(a_shape[1:])
        else:
            raise self._fail(f"factors of module '{module}' have unusable shapes A {a_shape} and B {b_shape}", tensor=a_key)

        rank_a, rank_b = a_shape[0], b_shape[1]
        if rank_a != rank_b:
            raise self._fail(
                f"rank mismatch: '{a_key}' has rank {rank_a} but '{b_key}' has rank {rank_b}", tensor=a_key
            )
        rank = match_pattern(cfg.get("rank_pattern") or {}, module, self.config_path)
        rank = cfg.get("r", 8) if rank is None else rank
        if rank_a != rank:
            raise self._fail(
                f"rank mismatch: the factors of module '{module}' have rank {rank_a} but {ADAPTER_CONFIG} says r={rank}",
                tensor=a_key,
            )
        alpha = match_pattern(cfg.get("alpha_pattern") or {}, module, self.config_path)
        alpha = cfg.get("lora_alpha", 8) if alpha is None else alpha
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

        target = self._resolve(f"{module}.weight", a_key)
        base_info = self.base.info(target)
        if not base_info.is_float:
            raise self._fail(f"LoRA targets base tensor '{target}' of dtype {base_info.dtype}, which is not floating point", tensor=a_key)
        if base_info.shape != delta_shape:
            raise self._fail(
                f"shape mismatch: ΔW from '{a_key}' and '{b_key}' is {delta_shape} but base tensor '{target}' is {base_info.shape}",
                tensor=a_key,
            )
        if target in self._modules:
            raise self._fail(f"modules '{self._modules[target].module}' and '{module}' both adapt base tensor '{target}'", tensor=a_key)
        self._modules[target] = LoraModule(
            module=module, kind=kind, target=target, a_key=a_key, b_key=b_key, rank=rank_a, alpha=float(alpha),
            scale=float(scale), fan_in_fan_out=bool(cfg.get("fan_in_fan_out")) and kind == "linear", delta_shape=delta_shape,
        )

        if "bias" in parts:
            bias_key = parts["bias"]
            bias_target = self._resolve(f"{module}.bias", bias_key)
            if self._adapter.info(bias_key).shape != self.base.info(bias_target).shape:
                raise self._fail(
                    f"lora_B bias has shape {self._adapter.info(bias_key).shape} but base tensor '{bias_target}' "
                    f"has {self.base.info(bias_target).shape}",
                    tensor=bias_key,
                )
            self._biases[bias_target] = LoraBias(key=bias_key, target=bias_target, scale=float(scale))

    # -- reading -----------------------------------------------------------------
    def lora_module(self, name: str) -> LoraModule | None:
        """How base tensor `name` is adapted, or None if it has no LoRA factors."""
        return self._modules.get(name)

    def adapted_names(self) -> list[str]:
        """Base tensors that receive a low-rank ΔW (or a LoRA bias delta)."""
        return [n for n in self._infos if n in self._modules or n in self._biases]

    def replaced_names(self) -> list[str]:
        """Base tensors replaced by a full tensor saved in the adapter (modules_to_save, trained biases)."""
        return [n for n in self._infos if n in self._replacements]

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The dense low-rank ΔW (already scaled) for base tensor `name`, or None if it has none."""
        self.info(name)
        assert self._adapter is not None
        module = self._modules.get(name)
        if module is not None:
            a = self._adapter.get(module.a_key).to(dtype)
            b = self._adapter.get(module.b_key).to(dtype)
            if module.kind == "linear":
                d = b @ a
                if module.fan_in_fan_out:
                    d = d.T
            elif module.kind == "embedding":
                d = (b @ a).T
            else:
                d = (b.reshape(b.shape[0], module.rank) @ a.reshape(module.rank, -1)).reshape(module.delta_shape)
            return (d * module.scale).contiguous()
        bias = self._biases.get(name)
        if bias is not None:
            return self._adapter.get(bias.key).to(dtype) * bias.scale
        return None

    def _load(self, name: str) -> torch.Tensor:
        assert self._adapter is not None
        dtype = self._infos[name].dtype
        if name in self._replacements:
            tensor = self._adapter.get(self._replacements[name])
        else:
            tensor = self.base.get(name)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        delta = self.delta(name, compute) if (name in self._modules or name in self._biases) else None
        if delta is None:
            return tensor.to(dtype)
        return (tensor.to(compute) + delta).to(dtype)

    @property
    def folder(self) -> Path:
        """The base's folder: config and tokenizer of the fine-tuned model are the base's."""
        return self.base.folder

    def files(self) -> list[Path]:
        return [self.config_path, self.adapter_file] + self.base.files()

    def close(self) -> None:
        if self._adapter is not None:
            self._adapter.close()
        if getattr(self, "_owns_base", False):
            self.base.close()
