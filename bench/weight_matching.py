"""Weight-matching time on CPU (or CUDA) for two model sizes people align in practice.

- ResNet-20 at 4× width (CIFAR layout: 3×3 stem, three stages of three basic
  blocks with 64/128/256 channels, projection shortcuts, BatchNorm), torchvision naming;
- a ViT-S-sized transformer (12 blocks, width 384, 6 heads, MLP 1536, 16×16
  patches at 224², 1000 classes), Hugging Face naming, heads permuted as units.

Each pair is two independently drawn random models (timing does not depend on
training); every repeat uses a fresh pair and reports the rounds it took.

    python bench/weight_matching.py --repeats 5 [--device cuda] [--out bench/results/weight_matching.md]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.alignment import load_spec, weight_matching  # noqa: E402


def resnet20_shapes(width: int = 4, classes: int = 10) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{leaf}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    c = 16 * width
    shapes["conv1.weight"] = (c, 3, 3, 3)
    bn("bn1", c)
    for stage, out in enumerate((16 * width, 32 * width, 64 * width), start=1):
        for block in range(3):
            p = f"layer{stage}.{block}"
            shapes[f"{p}.conv1.weight"] = (out, c, 3, 3)
            bn(f"{p}.bn1", out)
            shapes[f"{p}.conv2.weight"] = (out, out, 3, 3)
            bn(f"{p}.bn2", out)
            if c != out:
                shapes[f"{p}.downsample.0.weight"] = (out, c, 1, 1)
                bn(f"{p}.downsample.1", out)
            c = out
    shapes["fc.weight"] = (classes, c)
    shapes["fc.bias"] = (classes,)
    return shapes


def vit_small_shapes(depth: int = 12, d: int = 384, mlp: int = 1536, patch: int = 16, image: int = 224,
                     classes: int = 1000) -> dict[str, tuple[int, ...]]:
    tokens = (image // patch) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "vit.embeddings.cls_token": (1, 1, d),
        "vit.embeddings.position_embeddings": (1, tokens, d),
        "vit.embeddings.patch_embeddings.projection.weight": (d, 3, patch, patch),
        "vit.embeddings.patch_embeddings.projection.bias": (d,),
    }
    for i in range(depth):
        p = f"vit.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            shapes[f"{p}.attention.attention.{proj}.weight"] = (d, d)
            shapes[f"{p}.attention.attention.{proj}.bias"] = (d,)
        shapes[f"{p}.attention.output.dense.weight"] = (d, d)
        shapes[f"{p}.attention.output.dense.bias"] = (d,)
        shapes[f"{p}.intermediate.dense.weight"] = (mlp, d)
        shapes[f"{p}.intermediate.dense.bias"] = (mlp,)
        shapes[f"{p}.output.dense.weight"] = (d, mlp)
        shapes[f"{p}.output.dense.bias"] = (d,)
        for ln in ("layernorm_before", "layernorm_after"):
            shapes[f"{p}.{ln}.weight"] = (d,)
            shapes[f"{p}.{ln}.bias"] = (d,)
    shapes["vit.layernorm.weight"] = (d,)
    shapes["vit.layernorm.bias"] = (d,)
    shapes["classifier.weight"] = (classes, d)
    shapes["classifier.bias"] = (classes,)
    return shapes


def random_model(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(0)
            continue
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        out[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


def time_pair(spec_name: str, shapes: dict[str, tuple[int, ...]], repeats: int, device: str, **spec_options) -> dict:
    spec = load_spec(spec_name, shapes, **spec_options)
    params = sum(math.prod(s) for s in shapes.values())
    seconds, rounds = [], []
    for r in range(repeats):
        a, b = random_model(shapes, 2 * r), random_model(shapes, 2 * r + 1)
        start = time.perf_counter()
        result = weight_matching(spec, a, b, seed=r, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        rounds.append(result.rounds)
        print(f"  {spec_name} repeat {r}: {seconds[-1]:.2f} s, {result.rounds} rounds", file=sys.stderr)
    return {
        "params": params,
        "groups": len(spec.groups),
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "rounds": rounds,
        "s_per_round": statistics.median(s / n for s, n in zip(seconds, rounds)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "weight_matching.md")
    args = parser.parse_args(argv)

    rows = [
        ("ResNet-20 ×4 width (resnet spec)", time_pair("resnet", resnet20_shapes(4), args.repeats, args.device)),
        ("ViT-S, 12 blocks (vit spec, heads)", time_pair("vit", vit_small_shapes(), args.repeats, args.device, num_heads=6)),
    ]
    lines = [
        "# Weight-matching time",
        "",
        f"Device: {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"{args.repeats} repeats, each on a fresh pair of independent random models; seed = repeat index.",
        "",
        "| pair | parameters | groups | median time | fastest | rounds per run | median time per round |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['params'] / 1e6:.2f} M | {r['groups']} | {r['median_s']:.2f} s | {r['min_s']:.2f} s | "
            f"{', '.join(map(str, r['rounds']))} | {r['s_per_round']:.3f} s |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
