"""How long the interference analysis takes: exact on ~1 GB models, sampled on 7B-shaped ones.

1. Exact: a base and three fine-tunes of ~1 GB each (float32, transformer-like
   shapes), analysed exactly with per-tensor and with global thresholds.
2. Sampled: a base and three checkpoints with the real tensor shapes of a 7B
   Llama-style model (embeddings, head, and `--layers` of its 32 layers;
   bfloat16) instead of 13.5 GB each. A sampled analysis costs the same for
   every tensor of a shape, so the time for the whole 7B model is the measured
   time times (tensors in 32 layers) / (tensors here). Timed with the files in
   the page cache, and again after evicting them (posix_fadvise DONTNEED on
   these files only), which reads the sampled pages from disk.
   (Sparse files that hold data only where the sample reads would avoid the
   extrapolation, but on a file system mounted with `discard` deleting their
   hundreds of thousands of scattered blocks takes many minutes.)

    python bench/analysis_speed.py                 # both parts
    python bench/analysis_speed.py --skip-exact --layers 4

Results are printed and written as JSON (`--json`, default bench/results/analysis_speed.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.analysis import DEFAULT_SAMPLE_SIZE, analyze  # noqa: E402
from merging.checkpoint import open_checkpoint  # noqa: E402

LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "vocab": 32000, "layers": 32}


# -- 1. exact on ~1 GB models ----------------------------------------------------------------------------


def build_dense_family(folder: Path, size_gb: float, n_models: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """Base + fine-tunes as safetensors files (float32), task vectors correlated across models."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = []
    total = 0
    while total < size_gb * 1e9:
        i = len(shapes)
        shape = [(4096, 4096), (4096, 4096), (2752, 4096), (4096, 2752), (4096,)][i % 5]
        shapes.append((f"model.layers.{i // 5}.t{i % 5}.weight", shape))
        total += int(np.prod(shape)) * 4
    base = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in shapes}
    folder.mkdir(parents=True, exist_ok=True)
    base_path = folder / "base.safetensors"
    save_file(base, str(base_path))
    shared = {name: torch.randn(shape, generator=g) for name, shape in shapes}
    paths = []
    for k in range(n_models):
        ft = {name: base[name] + 1e-3 * (0.3 * shared[name] + torch.randn(shape, generator=g)) for name, shape in shapes}
        path = folder / f"ft{k}.safetensors"
        save_file(ft, str(path))
        paths.append(path)
        del ft
    return base_path, paths


# -- 2. sampled on 7B-shaped sparse files ------------------------------------------------------------------


def llama_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = LLAMA_7B["hidden"], LLAMA_7B["intermediate"], LLAMA_7B["vocab"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)), (p + "mlp.down_proj.weight", (h, f)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build_llama_family(folder: Path, layers: int, n_models: int, seed: int = 0) -> tuple[Path, list[Path]]:
    """Base + fine-tunes with the tensor shapes of a 7B Llama-style model, `layers` layers, bfloat16, real data."""
    from safetensors.torch import save_file

    shapes = llama_shapes(layers)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for name, shape in shapes}
    base_path = folder / "base.safetensors"
    save_file(base, str(base_path))
    shared_seed = seed + 1000
    paths = []
    for k in range(n_models):
        ft = {}
        gs = torch.Generator().manual_seed(shared_seed)
        for name, shape in shapes:
            shared = torch.randn(shape, generator=gs)
            ft[name] = (base[name].float() + 2e-3 * (0.3 * shared + torch.randn(shape, generator=g))).to(torch.bfloat16)
            del shared
        path = folder / f"ft{k}.safetensors"
        save_file(ft, str(path))
        paths.append(path)
        del ft
    return base_path, paths


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (only these files)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- running -------------------------------------------------------------------------------------------------


def timed(label: str, fn, repeats: int = 1) -> tuple[float, object]:
    """Best of `repeats` runs (the machine is shared; the best run is the least disturbed one)."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    print(f"  {label}: {best:.2f} s" + (f" (best of {repeats})" if repeats > 1 else ""), flush=True)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each exact-part model (default 1)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the 7B-shaped models, of 32 (default 2; times are extrapolated)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each sampled measurement; the best is reported (default 3)")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--skip-sampled", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the scratch files")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "analysis_speed.json")
    args = ap.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="alloy-analysis-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                                "load_average": os.getloadavg()}}
    _warm_kernels()  # compile (or load) the numba kernels, so compile time is not measured
    try:
        if not args.skip_exact:
            print(f"exact: base + 3 fine-tunes of ~{args.size_gb:g} GB (float32)", flush=True)
            dt, (base_path, paths) = timed("build", lambda: build_dense_family(work / "dense", args.size_gb, 3))
            base, models = open_checkpoint(base_path), [open_checkpoint(p) for p in paths]
            params = sum(base.info(n).numel for n in base.names())
            part = {"params_per_model": params, "bytes_per_model": os.path.getsize(base_path), "build_s": dt}
            for scope in ("tensor", "global"):
                dt, res = timed(f"analyze exact, {scope} scope", lambda: analyze(base, models, exact=True, scope=scope))
                part[f"{scope}_s"] = dt
                part[f"{scope}_params_per_s"] = 3 * params / dt
                part[f"{scope}_sign_conflict_at_0.2"] = float(res.sign_conflict_at(0.2))  # type: ignore[attr-defined]
            report["exact_1gb"] = part
            if not args.keep:
                shutil.rmtree(work / "dense", ignore_errors=True)
        if not args.skip_sampled:
            layers = args.layers
            print(f"sampled: base + 3 checkpoints shaped like a 7B model, {layers} of its 32 layers (bfloat16)", flush=True)
            dt, (base_path, paths) = timed("build", lambda: build_llama_family(work / "llama", layers, 3))
            for p in (base_path, *paths):  # written data reaches the disk before timing starts
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            base, models = open_checkpoint(base_path), [open_checkpoint(p) for p in paths]
            params = sum(base.info(n).numel for n in base.names())
            scale = (9 * LLAMA_7B["layers"] + 3) / (9 * layers + 3)  # tensors in the 7B model / tensors here
            part = {"layers": layers, "tensors": len(base.names()), "params_per_model": params,
                    "bytes_per_model": os.path.getsize(base_path), "build_s": dt, "sample_size": DEFAULT_SAMPLE_SIZE,
                    "block": "auto (1/16 of a row: 256 here)", "extrapolation_factor_to_32_layers": scale}
            for scope in ("global", "tensor"):
                dt, res = timed(f"analyze sampled, {scope} scope, files in page cache",
                                lambda: analyze(base, models, exact=False, scope=scope), repeats=args.repeats)
                part[f"{scope}_warm_s"] = dt
                part[f"{scope}_warm_s_7b_extrapolated"] = dt * scale
                part["analysed_params_per_model"] = res.analysed_params  # type: ignore[attr-defined]
                part[f"{scope}_sign_conflict_at_0.2"] = float(res.sign_conflict_at(0.2))  # type: ignore[attr-defined]
            evict([base_path, *paths])
            base, models = open_checkpoint(base_path), [open_checkpoint(p) for p in paths]
            dt, _ = timed("analyze sampled, global scope, files evicted from the page cache",
                          lambda: analyze(base, models, exact=False, scope="global"))
            part["global_cold_s"] = dt
            part["global_cold_s_7b_extrapolated"] = dt * scale
            # Cold reads cost one 4 KB page per sampled block: shorter blocks read more pages (and give
            # estimates closer to those of independent elements when neighbouring weights are correlated).
            evict([base_path, *paths])
            dt, _ = timed("analyze sampled, global scope, files evicted, blocks of 16",
                          lambda: analyze(base, models, exact=False, scope="global", block_size=16))
            part["global_cold_block16_s"] = dt
            part["global_cold_block16_s_7b_extrapolated"] = dt * scale
            print(f"  7B (32 layers) extrapolated: {part['global_warm_s_7b_extrapolated']:.1f} s warm, "
                  f"{part['global_cold_s_7b_extrapolated']:.1f} s cold (global scope)", flush=True)
            report["sampled_7b"] = part
            if not args.keep:
                shutil.rmtree(work / "llama", ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def _warm_kernels() -> None:
    """Compile (or load) the numba kernels on a tiny input first."""
    from merging.checkpoint import Checkpoint, TensorInfo

    class Tiny(Checkpoint):
        def __init__(self, name: str, t: torch.Tensor):
            super().__init__(name)
            self.t = t
            self._infos = {"w": TensorInfo("w", tuple(t.shape), t.dtype)}

        def _load(self, name: str) -> torch.Tensor:
            return self.t

    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 64, generator=g)
    analyze(Tiny("b", base), [Tiny(f"m{i}", base + 0.01 * torch.randn(64, 64, generator=g)) for i in range(3)])


if __name__ == "__main__":
    sys.exit(main())
