"""Throughput and peak RSS of TIES, DARE, Breadcrumbs and PCB, numba kernels vs eager torch.

Builds a base and N synthetic fine-tunes (default 3) of `--size-gb` each in a
scratch folder (not the repository), then, for every method x scope x backend,
runs `alloy merge` in a fresh process per repeat and reports the median time,
GB/s of input read, the ratio to reading the inputs once, and the peak RSS
(VmHWM). In the same run it measures the machine's memory bandwidth (copy and
read) and the read-once time, so the ratios are comparable on a noisy machine.

Backends: `numba` (CPU kernels), `torch` (the same ops in eager torch on the
CPU), and `naive`, a plain mergekit-style eager-torch TIES (topk mask, sign of
the sum, mean of the agreeing entries) run through the same executor.

    python bench/sparse_methods.py                       # small default, a few minutes
    python bench/sparse_methods.py --size-gb 1 --repeats 3 --json /tmp/sparse.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from merge_throughput import build_family, memory_bandwidth_gbps, read_once, read_raw  # noqa: E402

from merging.methods import MergeMethod, Param, TensorJob, method_names, register  # noqa: E402

# (label, method, extra parameters, backends) — the defaults of every method, both scopes where they exist
CASES = [
    ("task_arithmetic", "task_arithmetic", {}, ("numba",)),  # the executor's floor: read, add, write
    ("ties tensor", "ties", {"scope": "tensor"}, ("numba", "torch", "naive")),
    ("ties global", "ties", {"scope": "global"}, ("numba", "torch")),
    ("dare_linear", "dare_linear", {}, ("numba", "torch")),
    ("dare_ties tensor", "dare_ties", {"scope": "tensor"}, ("numba", "torch")),
    ("dare_ties global", "dare_ties", {"scope": "global"}, ("numba", "torch")),
    ("breadcrumbs row", "breadcrumbs", {"scope": "row"}, ("numba", "torch")),
    ("breadcrumbs global", "breadcrumbs", {"scope": "global"}, ("numba", "torch")),
    ("pcb tensor", "pcb", {"scope": "tensor"}, ("numba", "torch")),
    ("pcb global", "pcb", {"scope": "global"}, ("numba", "torch")),
]


# -- the plain eager-torch TIES used as the comparison point ---------------------------------

if "naive_ties" not in method_names():

    @register
    class NaiveTies(MergeMethod):
        """TIES as a few lines of eager torch (mergekit's structure), per tensor."""

        name = "naive_ties"
        title = "TIES (plain eager torch, for benchmarks)"
        params = (
            Param("weight", 1.0, float, "per-model weight", per_model=True),
            Param("density", 0.2, float, "fraction kept per tensor", per_model=True),
            Param("lambda", 1.0, float, "scale"),
        )

        def merge(self, job: TensorJob) -> torch.Tensor:
            tv = job.task_vectors() * job.per_model("weight").view(-1, *([1] * job.base.dim()))
            flat = tv.reshape(job.n, -1)
            dens = job.per_model("density")
            mask = torch.zeros_like(flat, dtype=torch.bool)
            for i in range(job.n):
                k = int(float(dens[i]) * flat.shape[1])
                if k > 0:
                    mask[i, flat[i].abs().topk(k).indices] = True
            trimmed = flat * mask
            sign = torch.sign(trimmed.sum(0))
            sign[sign == 0] = 1.0
            agree = (torch.sign(trimmed) == sign) & mask
            total = (trimmed * agree).sum(0)
            count = agree.sum(0).clamp(min=1)
            return job.base + job.params["lambda"] * (total / count).reshape(job.base.shape)


# -- measurements ------------------------------------------------------------------------------

def read_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Read-only memory bandwidth: a parallel numba sum over a large array (median of 5)."""
    import numba

    @numba.njit(parallel=True, cache=False)
    def total(a):
        s = 0.0
        for i in numba.prange(a.shape[0]):
            s += a[i]
        return s

    a = np.ones(nbytes // 4, np.float32)
    total(a[:1000])
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        total(a)
        times.append(time.perf_counter() - t0)
    return a.nbytes / statistics.median(times) / 1e9


def run_process(recipe: Path, out: Path) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one `alloy merge` in a fresh process (with the naive method registered).

    The clock starts after the imports and after loading the compiled kernels
    from numba's cache (about a second once per process), so it times the merge.
    """
    code = (
        "import sys, time; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/bench']; import sparse_methods; "
        "import merging.executor; from merging.kernels.numba_backend import warm_up; warm_up(); "
        "from merging.cli import main; t = time.perf_counter(); rc = main(sys.argv[2:]); dt = time.perf_counter() - t; "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
        "print('BENCH', dt, int(hwm.split()[1]) * 1024); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), "merge", str(recipe), "-o", str(out), "--force", "-q"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{recipe.name}: {proc.stderr.strip()}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("BENCH"))
    _, dt, rss = line.split()
    return float(dt), int(rss)


def compute_only(paths: list[Path], method_name: str, params: dict, backend_name: str, budget_bytes: int, repeats: int) -> float:
    """GB/s of input of the method alone on tensors already in memory (no reading, no writing)."""
    from dataclasses import replace

    from merging.checkpoint import open_checkpoint
    from merging.kernels import get_backend
    from merging.methods import get_method

    cks = [open_checkpoint(p) for p in paths]
    names, used = [], 0
    for name in cks[0].names():
        if used >= budget_bytes:
            break
        names.append(name)
        used += sum(ck.info(name).nbytes for ck in cks)
    data = {n: (cks[0].get(n).float(), torch.stack([ck.get(n).float() for ck in cks[1:]])) for n in names}
    method = get_method("naive_ties" if backend_name == "naive" else method_name)
    backend = get_backend("torch" if backend_name == "naive" else backend_name, "cpu")
    top = {p.name: p.default for p in method.params}
    if backend_name != "naive":
        top.update(params)

    def stream():
        for n, (b, m) in data.items():
            yield TensorJob(n, b, m, torch.ones(m.shape[0]), dict(top), seed=0, backend=backend, model_ids=tuple(range(m.shape[0])))

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats = method.prepare(top, stream) if method.needs_prepare(top) else None
        for job in stream():
            method.merge(replace(job, stats=stats))
        times.append(time.perf_counter() - t0)
    return used / statistics.median(times) / 1e9


def write_recipe(folder: Path, label: str, method: str, params: dict, backend: str, models: list[str]) -> Path:
    lines = [
        f"merge_method: {'naive_ties' if backend == 'naive' else method}",
        "base_model: base",
        f"models: {json.dumps(models)}",
        "device: cpu",
        f"backend: {'torch' if backend == 'naive' else backend}",
    ]
    if params and backend != "naive":
        lines.append(f"parameters: {json.dumps(params)}")
    path = folder / f"{label.replace(' ', '_')}-{backend}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def markdown(results: dict) -> str:
    """The run as Markdown tables (for bench/results/)."""
    m = results["machine"]
    lines = [
        "# Sparse merge methods: throughput and peak RSS",
        "",
        f"Base + {results.get('models', 3)} synthetic fine-tunes, {results['input_gb']:.2f} GB of float32 input in all; "
        f"{m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads). Memory bandwidth measured in the same run: "
        f"copy {results['memory_copy_gbps']} GB/s (read + write), read {results['memory_read_gbps']} GB/s. "
        f"Reading every input tensor once (the reader's `get`, a fresh buffer per tensor): {results['read_once_s']:.2f} s; "
        f"copying the input files' bytes into one reused buffer (the page-cache floor): {results['read_raw_s']:.2f} s. "
        "End-to-end = `alloy merge` in a fresh process (read, merge, write the output folder), median of the runs listed.",
        "",
        "| case | backend | median s | runs | GB/s of input | x read-once | x raw copy | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(f"| {r['case']} | {r['backend']} | {r['median_s']:.2f} | {len(r['times_s'])} | {r['gbps']:.2f} | {r['x_read_once']:.2f} | {r['x_read_raw']:.2f} | {r['peak_rss_mb']:.0f} |")
    if results.get("compute_only"):
        lines += ["", "Compute only (inputs already in memory, no reading or writing), GB/s of input:", "",
                  "| case | numba | torch (eager) | naive torch TIES |", "|---|---:|---:|---:|"]
        table: dict = {}
        for r in results["compute_only"]:
            table.setdefault(r["case"], {})[r["backend"]] = r["gbps"]
        for case, row in table.items():
            cells = [f"{row[b]:.2f}" if b in row else "" for b in ("numba", "torch", "naive")]
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def selected_cases(args: argparse.Namespace):
    """(label, method, params, backend, repeats) of every case and backend the options select."""
    for label, method, params, backends in CASES:
        if args.case and label not in args.case:
            continue
        for backend in backends:
            if args.backend and backend not in args.backend:
                continue
            yield label, method, params, backend, args.repeats if backend == "numba" else (args.torch_repeats or args.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.25, help="size of each model in GB (default 0.25; the README figures use 1)")
    ap.add_argument("--models", type=int, default=3, help="fine-tunes besides the base")
    ap.add_argument("--repeats", type=int, default=3, help="runs per numba case (median)")
    ap.add_argument("--torch-repeats", type=int, default=None, help="runs per torch/naive case (default: --repeats)")
    ap.add_argument("--compute-gb", type=float, default=0.5, help="input held in memory for the compute-only table (0: skip it)")
    ap.add_argument("--case", action="append", help="only these cases (labels as printed, e.g. 'ties tensor')")
    ap.add_argument("--backend", action="append", choices=["numba", "torch", "naive"], help="only these backends")
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "alloy-bench")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--markdown", type=Path, help="write the tables as Markdown here too")
    args = ap.parse_args()

    from merging.kernels.numba_backend import warm_up

    warm_up()  # compile once here so that no timed process pays JIT time
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "memory_copy_gbps": round(memory_bandwidth_gbps(), 2),
        "memory_read_gbps": round(read_bandwidth_gbps(), 2),
        "runs": [],
    }
    print(f"memory bandwidth: copy {results['memory_copy_gbps']} GB/s (read + write), read {results['memory_read_gbps']} GB/s")
    folder = args.scratch / f"float32-{args.size_gb:g}gb-{args.models}"
    paths = build_family(folder, args.size_gb, args.models, torch.float32)
    input_gb = sum(sum(f.stat().st_size for f in p.glob("*.safetensors")) for p in paths) / 1e9
    read_once(paths)  # warm the page cache the same way for every measurement
    read_s = statistics.median(read_once(paths) for _ in range(args.repeats))
    raw_s = statistics.median(read_raw(paths) for _ in range(args.repeats))
    results.update(input_gb=round(input_gb, 3), read_once_s=round(read_s, 3), read_raw_s=round(raw_s, 3))
    print(f"{args.size_gb:g} GB x {args.models + 1} models ({input_gb:.2f} GB input): read once {read_s:.2f} s = {input_gb / read_s:.2f} GB/s, "
          f"raw file copy {raw_s:.2f} s = {input_gb / raw_s:.2f} GB/s\n")
    print(f"{'case':20s} {'backend':7s} {'median s':>9s} {'GB/s':>6s} {'x read':>7s} {'x raw':>6s} {'peak RSS MB':>12s}")
    models = [p.name for p in paths[1:]]
    for label, method, params, backend, repeats in selected_cases(args):
        recipe = write_recipe(folder, label, method, params, backend, models)
        out = folder / "out"
        runs = [run_process(recipe, out) for _ in range(repeats)]
        shutil.rmtree(out, ignore_errors=True)
        secs = statistics.median(r[0] for r in runs)
        row = {
            "case": label, "backend": backend, "median_s": round(secs, 3), "times_s": [round(r[0], 3) for r in runs],
            "gbps": round(input_gb / secs, 3), "x_read_once": round(secs / read_s, 2), "x_read_raw": round(secs / raw_s, 2),
            "peak_rss_mb": round(max(r[1] for r in runs) / 1e6, 1),
        }
        results["runs"].append(row)
        print(f"{label:20s} {backend:7s} {secs:9.2f} {row['gbps']:6.2f} {row['x_read_once']:7.2f} {row['x_read_raw']:6.2f} {row['peak_rss_mb']:12.1f}", flush=True)
    if args.compute_gb > 0:
        print(f"\ncompute only (inputs already in memory, {args.compute_gb:g} GB of input), GB/s of input:")
        results["compute_only"] = []
        for label, method, params, backend, repeats in selected_cases(args):
            gbps = compute_only(paths, method, params, backend, int(args.compute_gb * 1e9), repeats)
            results["compute_only"].append({"case": label, "backend": backend, "gbps": round(gbps, 3)})
            print(f"  {label:20s} {backend:7s} {gbps:6.2f}", flush=True)
    by = {(r["case"], r["backend"]): r["median_s"] for r in results["runs"]}
    if ("ties tensor", "numba") in by and ("ties global", "numba") in by:
        t, g = by[("ties tensor", "numba")], by[("ties global", "numba")]
        print(f"\nTIES numba: tensor scope {t / read_s:.2f}x read-once, {t / raw_s:.2f}x raw file copy (target <= 3); "
              f"global / tensor {g / t:.2f} (target <= 2)")
    results["models"] = args.models
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results))


if __name__ == "__main__":
    main()
