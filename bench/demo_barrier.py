"""Loss and accuracy along α for naive vs aligned interpolation of the demo's independently trained pairs.

Uses the demo workspace (`merging.demo`): two MLPs and two small ResNets, each
pair trained on the bundled digits from different seeds. For each pair, model
B is aligned to A by weight matching (spec `mlp` / `resnet`), then both paths
`(1 − α)·A + α·B` and `(1 − α)·A + α·π(B)` are scored on the test split. The
ResNet pair is also scored with BatchNorm statistics recomputed on the training
images at every α (ALGORITHMS_DETAIL.md §8.8): without that, interpolated BN
networks suffer variance collapse and every path looks bad.

    python bench/demo_barrier.py [--workspace DIR] [--steps 11] [--out bench/results/demo_barrier.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging import demo_models as dm  # noqa: E402
from merging.alignment import apply_permutations, load_spec, loss_barrier, weight_matching  # noqa: E402
from merging.demo import build_demo_workspace  # noqa: E402


def barrier_for(folder_a: Path, folder_b: Path, spec_name: str, alphas: list[float], *, recompute_bn: bool, seed: int):
    a, b = dm.load_state(folder_a), dm.load_state(folder_b)
    config = dm.load_config(folder_a)
    spec = load_spec(spec_name, {n: tuple(t.shape) for n, t in a.items()})
    start = time.perf_counter()
    match = weight_matching(spec, a, b, seed=seed)
    seconds = time.perf_counter() - start
    b_aligned = apply_permutations(spec, b, match.perms)

    def evaluate(params):
        scores = dm.evaluate(params, config, recompute_bn=recompute_bn)
        return {"loss": scores["loss"], "accuracy": scores["accuracy"]}

    return loss_barrier(evaluate, a, b, b_aligned, alphas), match, seconds


def table(title: str, result, match, seconds: float) -> list[str]:
    d = result.to_dict()
    lines = [
        f"## {title}",
        "",
        f"Weight matching: {match.rounds} rounds ({seconds:.2f} s), objective Σ⟨A, π(B)⟩ "
        f"{match.objectives[0]:.2f} → {match.objective:.2f}.",
        "",
        "| α | naive loss | aligned loss | naive accuracy | aligned accuracy |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, alpha in enumerate(d["alphas"]):
        lines.append(
            f"| {alpha:.2f} | {d['naive']['loss'][i]:.4f} | {d['aligned']['loss'][i]:.4f} | "
            f"{d['naive']['accuracy'][i]:.3f} | {d['aligned']['accuracy'][i]:.3f} |"
        )
    lines += [
        "",
        f"Loss barrier (max along α − mean of the endpoints): naive **{d['naive']['barrier']:.4f}**, "
        f"aligned **{d['aligned']['barrier']:.4f}**. "
        f"(Against the straight line between the endpoint losses: naive {d['naive']['barrier_linear']:.4f}, "
        f"aligned {d['aligned']['barrier_linear']:.4f}.)",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, help="demo workspace folder (default: the user cache)")
    parser.add_argument("--steps", type=int, default=11, help="points on the α grid, ends included (default 11)")
    parser.add_argument("--seed", type=int, default=0, help="weight-matching seed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_barrier.md")
    parser.add_argument("--json", type=Path, help="also write every curve as JSON")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")

    ws = build_demo_workspace(args.workspace, progress=lambda m: print(m, file=sys.stderr))
    alphas = [i / (args.steps - 1) for i in range(args.steps)]
    runs = [
        ("Demo MLPs (seed a vs seed b), test split", ws.mlp_seed_a, ws.mlp_seed_b, "mlp", False),
        ("Demo ResNets (seed a vs seed b), test split, BatchNorm statistics recomputed at every α", ws.cnn_seed_a, ws.cnn_seed_b, "resnet", True),
        ("Demo ResNets, stored BatchNorm statistics (no recompute)", ws.cnn_seed_a, ws.cnn_seed_b, "resnet", False),
    ]
    lines = [
        "# Loss barrier on the demo pairs: naive vs aligned interpolation",
        "",
        "Path `(1 − α)·A + α·B` (naive) and `(1 − α)·A + α·π(B)` (aligned by weight matching); "
        "cross-entropy and accuracy on the digits test split (450 images).",
        "",
    ]
    dump = {}
    for title, a, b, spec_name, recompute in runs:
        print(f"{title} ...", file=sys.stderr)
        result, match, seconds = barrier_for(a, b, spec_name, alphas, recompute_bn=recompute, seed=args.seed)
        lines += table(title, result, match, seconds)
        dump[title] = result.to_dict() | {"match": match.to_dict()}
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(dump, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
