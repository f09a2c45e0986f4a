"""Multi-task accuracy of the demo models merged by each method at its default settings.

Builds (or reuses) the demo workspace, merges its three digit-task fine-tunes
with every method through a recipe and the streaming executor, scores each
merged model on the held-out digits, and writes a Markdown table beside the
scores of the base and of each fine-tune.

    python bench/demo_accuracy.py [--workspace DIR] [--out bench/results/demo_accuracy.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging import demo, demo_models as dm  # noqa: E402
from merging.executor import run_merge  # noqa: E402
from merging.methods import get_method  # noqa: E402
from merging.recipe import parse_recipe  # noqa: E402

METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "pcb"]
SEED = 0


def defaults_text(method: str) -> str:
    params = get_method(method).params
    shown = [f"{p.name}={p.default}" for p in params if p.name != "weight"]
    return ", ".join(shown)


def merge_and_score(workspace: demo.DemoWorkspace, method: str, scratch: Path) -> tuple[dict, float]:
    models = "\n".join(f"  - model: {p}" for p in workspace.finetunes.values())
    recipe = parse_recipe(
        f"merge_method: {method}\nbase_model: {workspace.base}\nmodels:\n{models}\nseed: {SEED}\ndevice: cpu\n",
        base_dir=workspace.root,
    )
    out = scratch / method
    start = time.perf_counter()
    run_merge(recipe, out, overwrite=True)
    seconds = time.perf_counter() - start
    return dm.evaluate(out), seconds


def row(name: str, scores: dict, note: str = "") -> str:
    tasks = [f"{scores['task_accuracy'][t]:.3f}" for t in dm.TASKS]
    return f"| {name} | " + " | ".join(tasks) + f" | **{scores['mean_task_accuracy']:.3f}** | {scores['accuracy']:.3f} | {note} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=None, help="demo workspace folder (default: the user cache)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_accuracy.md")
    args = ap.parse_args()
    workspace = demo.build_demo_workspace(args.workspace, progress=lambda m: print(m, file=sys.stderr))
    header = "| model | " + " | ".join(f"digits {t}" for t in dm.TASKS) + " | mean task acc. | overall acc. | settings |"
    lines = [header, "|" + "---|" * (len(dm.TASKS) + 4)]
    lines.append(row("base", dm.evaluate(workspace.base), "the shared starting point"))
    for task, folder in workspace.finetunes.items():
        lines.append(row(f"fine-tune {task}", dm.evaluate(folder), f"trained on digits {task} only"))
    with tempfile.TemporaryDirectory(prefix="alloy-demo-acc-") as tmp:
        for method in METHODS:
            scores, seconds = merge_and_score(workspace, method, Path(tmp))
            lines.append(row(f"**{method}**", scores, defaults_text(method)))
            print(f"{method}: mean task accuracy {scores['mean_task_accuracy']:.3f} ({seconds:.2f} s)", file=sys.stderr)
    text = (
        "# Merging the demo fine-tunes: accuracy per method at default settings\n\n"
        "Three fine-tunes of one MLP base, each trained on one group of digits "
        "(scikit-learn's 8x8 digits, held-out test split), merged by every method with its default "
        f"parameters and equal model weights (seed {SEED} for DARE). Task accuracy is the 10-way "
        "accuracy on the test images of that task's digits; *mean task acc.* averages the three tasks. "
        f"Produced by `python bench/demo_accuracy.py`.\n\n" + "\n".join(lines) + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
