"""Merge throughput (GB/s of input read) and peak RSS for synthetic checkpoints.

Builds a base and N fine-tunes of a given size in a scratch folder (streamed,
so building needs no RAM either), then runs `alloy merge` in a fresh process per
repeat and reads its peak RSS from the kernel. Also measures what reading the
inputs once costs (the I/O bound) and the machine's memory bandwidth, in the
same run, so ratios are meaningful on a noisy machine.

    python bench/merge_throughput.py --size-gb 1 --size-gb 4 --repeats 3
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

from merging.formats.safetensors_writer import PlannedTensor, ShardedSafetensorsWriter  # noqa: E402

ROW = 4096


def tensor_plan(size_bytes: int, dtype: torch.dtype) -> list[PlannedTensor]:
    """Transformer-like shapes: (4096, 4096), (11008, 4096) ... until the size is reached."""
    shapes = [(ROW, ROW), (ROW, ROW), (2752, ROW), (ROW, 2752), (ROW,)]
    plan, total, i = [], 0, 0
    while total < size_bytes:
        shape = shapes[i % len(shapes)]
        t = PlannedTensor(f"layers.{i // len(shapes)}.t{i % len(shapes)}", shape, dtype)
        plan.append(t)
        total += t.nbytes
        i += 1
    return plan


def build_family(folder: Path, size_gb: float, n_models: int, dtype: torch.dtype) -> list[Path]:
    plan = tensor_plan(int(size_gb * 1e9), dtype)
    paths = []
    for m in range(n_models + 1):
        path = folder / ("base" if m == 0 else f"ft{m}")
        path.mkdir(parents=True, exist_ok=True)
        if not (path / "done").exists():
            writer = ShardedSafetensorsWriter(path, plan, max_shard_bytes=int(2e9))
            g = torch.Generator().manual_seed(1000 + m)
            for t in plan:
                base = torch.Generator().manual_seed(hash_name(t.name))
                x = torch.randn(t.shape, generator=base)
                if m:
                    x += 0.01 * torch.randn(t.shape, generator=g)
                writer.write(t.name, x.to(dtype))
            writer.close()
            (path / "done").write_text("")
        paths.append(path)
    return paths


def hash_name(name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


def read_once(paths: list[Path]) -> float:
    """Seconds to read every tensor of every input once (the I/O floor of a merge)."""
    from merging.checkpoint import open_checkpoint

    t0 = time.perf_counter()
    for p in paths:
        ck = open_checkpoint(p)
        for name in ck.names():
            ck.get(name).sum()
    return time.perf_counter() - t0


def read_raw(paths: list[Path], chunk: int = 64 << 20) -> float:
    """Seconds to copy every input file's bytes into one reused buffer: the page-cache floor, no parsing."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
    return time.perf_counter() - t0


def memory_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / statistics.median(times) / 1e9  # read + write


def run_merge_process(recipe: Path, out: Path, extra: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one `alloy merge` in a fresh process."""
    # VmHWM is this process's own peak; ru_maxrss would also count the parent's peak inherited at fork.
    code = (
        "import sys, time; from merging.cli import main; t=time.perf_counter(); rc=main(sys.argv[1:]); "
        "dt=time.perf_counter()-t; hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
        "print('BENCH', dt, int(hwm.split()[1])*1024); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "merge", str(recipe), "-o", str(out), "--force", "-q", *extra],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("BENCH"))
    _, dt, rss = line.split()
    return float(dt), int(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, action="append", help="size of each model (repeatable); default 1")
    ap.add_argument("--models", type=int, default=3, help="fine-tunes besides the base")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--method", action="append", help="methods to time (default: task_arithmetic linear)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "alloy-bench")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    sizes = args.size_gb or [1.0]
    methods = args.method or ["task_arithmetic", "linear"]
    dtype = getattr(torch, args.dtype)
    results = {"memory_bandwidth_gbps": round(memory_bandwidth_gbps(), 2), "runs": []}
    print(f"memory bandwidth (copy): {results['memory_bandwidth_gbps']} GB/s")
    for size in sizes:
        folder = args.scratch / f"{args.dtype}-{size:g}gb-{args.models}"
        paths = build_family(folder, size, args.models, dtype)
        input_gb = sum(sum(f.stat().st_size for f in p.glob("*.safetensors")) for p in paths) / 1e9
        read_once(paths)  # warm the page cache the same way for every measurement
        read_s = statistics.median(read_once(paths) for _ in range(args.repeats))
        print(f"\n{size:g} GB x {args.models + 1} models ({input_gb:.2f} GB input): read once {read_s:.2f} s = {input_gb / read_s:.2f} GB/s")
        for method in methods:
            recipe = folder / f"{method}.yaml"
            models = [p.name for p in paths[1:]]
            base_line = "base_model: base\n" if method != "linear" else ""
            recipe.write_text(f"merge_method: {method}\n{base_line}models: {json.dumps(models)}\n")
            out = folder / f"out-{method}"
            runs = [run_merge_process(recipe, out, []) for _ in range(args.repeats)]
            secs = statistics.median(r[0] for r in runs)
            rss = max(r[1] for r in runs)
            shutil.rmtree(out, ignore_errors=True)
            row = {
                "size_gb": size, "method": method, "input_gb": round(input_gb, 3), "median_s": round(secs, 3),
                "gbps": round(input_gb / secs, 3), "read_once_s": round(read_s, 3), "x_read_once": round(secs / read_s, 2),
                "peak_rss_mb": round(rss / 1e6, 1),
            }
            results["runs"].append(row)
            print(f"  {method:16s} median {secs:6.2f} s  {row['gbps']:5.2f} GB/s  {row['x_read_once']:4.2f}x read-once  peak RSS {row['peak_rss_mb']:7.1f} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
